"""Ollama-style chat and generate, end to end: gateway -> Celery worker -> Redis Stream."""

import httpx
import pytest

from harness.helpers import MODEL, auth, chat_body, in_flight, ndjson, png, usage_rows

pytestmark = pytest.mark.usefixtures("worker")

FINAL_FIELDS = {
    "done_reason",
    "total_duration",
    "load_duration",
    "prompt_eval_count",
    "prompt_eval_duration",
    "eval_count",
    "eval_duration",
    "gpu_seconds",
    "queue_duration",
}


class TestStreamedChat:
    def test_tokens_stream_then_a_final_chunk_with_durations_and_cost(
        self, gateway, tenant_factory, sessions, redis_client
    ):
        tenant_id, key, key_id = tenant_factory.create("free")
        body = chat_body(images=[png()], num_predict=12, temperature=0)
        with httpx.stream(
            "POST", f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60
        ) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("application/x-ndjson")
            request_id = response.headers["x-request-id"]
            chunks = list(ndjson(response))

        *tokens, final = chunks
        assert tokens, "expected at least one token chunk before the final one"
        for chunk in tokens:
            assert chunk["done"] is False
            assert chunk["model"] == MODEL
            assert chunk["message"]["role"] == "assistant"
        assert final["done"] is True
        assert final.keys() >= FINAL_FIELDS
        assert final["done_reason"] == "length"
        assert final["eval_count"] == 12
        # 576 image tokens (CLIP ViT-L/14 at 336 px) plus the text of the prompt.
        assert final["prompt_eval_count"] > 576
        assert final["gpu_seconds"] > 0
        assert final["total_duration"] >= final["prompt_eval_duration"] + final["eval_duration"]

        [record] = usage_rows(sessions, request_id)
        assert record.tenant_id == tenant_id
        assert record.api_key_id == key_id
        assert record.status == "completed"
        assert record.kind == "chat"
        assert record.output_tokens == 12
        assert record.prompt_tokens == final["prompt_eval_count"]
        assert record.gpu_seconds == pytest.approx(final["gpu_seconds"], abs=1e-6)
        assert in_flight(redis_client, tenant_id) == 0

    def test_multi_turn_chat_with_images_in_earlier_turns(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("pro")
        body = {
            "model": MODEL,
            "messages": [
                {"role": "system", "content": "Answer briefly."},
                {"role": "user", "content": "What colour is this?", "images": [png(color="blue")]},
                {"role": "assistant", "content": "Blue."},
                {"role": "user", "content": "And this one?", "images": [png(color="green")]},
            ],
            "options": {"num_predict": 4, "temperature": 0},
        }
        response = httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60)
        final = list(ndjson(response))[-1]
        assert final["done"] is True
        assert final["prompt_eval_count"] > 2 * 576


class TestNonStreamed:
    def test_chat_returns_one_object_with_the_whole_answer(self, gateway, tenant_factory, sessions):
        _, key, _ = tenant_factory.create("free")
        body = chat_body(images=[png()], num_predict=6, temperature=0) | {"stream": False}
        response = httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60)
        assert response.status_code == 200
        answer = response.json()
        assert answer["done"] is True
        assert answer["eval_count"] == 6
        assert isinstance(answer["message"]["content"], str)
        [record] = usage_rows(sessions, response.headers["x-request-id"])
        assert record.gpu_seconds == pytest.approx(answer["gpu_seconds"], abs=1e-6)

    def test_same_seed_gives_the_same_answer(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("pro")
        body = chat_body(num_predict=8, temperature=0.9, seed=123) | {"stream": False}
        first = httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60)
        second = httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60)
        assert first.json()["message"]["content"] == second.json()["message"]["content"]


class TestGenerate:
    def test_generate_streams_responses_with_an_image(self, gateway, tenant_factory, sessions):
        _, key, _ = tenant_factory.create("free")
        body = {
            "model": MODEL,
            "prompt": "Describe the image.",
            "images": [png()],
            "system": "You are terse.",
            "options": {"num_predict": 5, "temperature": 0},
        }
        with httpx.stream(
            "POST", f"{gateway.url}/api/generate", json=body, headers=auth(key), timeout=60
        ) as response:
            assert response.status_code == 200
            request_id = response.headers["x-request-id"]
            chunks = list(ndjson(response))
        assert all("response" in chunk for chunk in chunks)
        assert chunks[-1]["done"] is True and chunks[-1]["eval_count"] == 5
        [record] = usage_rows(sessions, request_id)
        assert record.kind == "generate"

    def test_generate_accepts_curl_style_form_content_type(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        response = httpx.post(
            f"{gateway.url}/api/generate",
            content=b'{"model": "llava-llama3", "prompt": "hi", "stream": false, '
            b'"options": {"num_predict": 2}}',
            headers=auth(key) | {"Content-Type": "application/x-www-form-urlencoded"},
            timeout=60,
        )
        assert response.status_code == 200
        assert response.json()["eval_count"] == 2

    def test_empty_prompt_loads_the_model_without_running_it(
        self, gateway, tenant_factory, sessions
    ):
        _, key, _ = tenant_factory.create("free")
        response = httpx.post(
            f"{gateway.url}/api/generate", json={"model": MODEL}, headers=auth(key), timeout=60
        )
        assert response.status_code == 200
        assert response.json()["done_reason"] == "load"
        assert "x-request-id" not in response.headers


class TestStopStrings:
    def test_output_ends_before_the_stop_string(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("pro")
        body = chat_body(num_predict=60, temperature=1.0, seed=5) | {"stream": False}
        full = httpx.post(
            f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60
        ).json()
        text = full["message"]["content"]
        assert full["done_reason"] == "length"
        stop = next(
            (
                text[i : i + 2]
                for i in range(3, len(text) - 2)
                if text[i : i + 2].isprintable()
                and text[i : i + 2].strip()
                and "\ufffd" not in text[i : i + 2]
            ),
            None,
        )
        assert stop is not None, f"no printable pair of characters to stop at in {text!r}"
        body["options"]["stop"] = [stop]
        cut = httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60).json()
        assert cut["message"]["content"] == text[: text.index(stop)]
        assert cut["done_reason"] == "stop"
        assert cut["eval_count"] < full["eval_count"]
