"""A dropped stream is resumed where it left off, without losing or repeating tokens."""

import json

import httpx
import pytest

from harness.helpers import MODEL, auth, chat_body, ndjson

pytestmark = pytest.mark.usefixtures("worker")

TOKENS = 300


def whole_answer(gateway, key, body) -> str:
    response = httpx.post(
        f"{gateway.url}/api/chat", json=body | {"stream": False}, headers=auth(key), timeout=120
    )
    return response.json()["message"]["content"]


class TestNdjson:
    def test_drop_after_some_lines_then_resume_after_n(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        body = chat_body("Tell me everything.", num_predict=TOKENS, temperature=0.7, seed=21)
        expected = whole_answer(gateway, key, body)
        with httpx.Client(timeout=60) as client:
            request = client.build_request(
                "POST", f"{gateway.url}/api/chat", json=body, headers=auth(key)
            )
            response = client.send(request, stream=True)
            request_id = response.headers["x-request-id"]
            lines = ndjson(response)
            received = [next(lines) for _ in range(5)]
            response.close()  # the connection drops
        resumed = httpx.get(
            f"{gateway.url}/api/jobs/{request_id}/stream",
            params={"after": len(received)},
            headers=auth(key),
            timeout=120,
        )
        assert resumed.status_code == 200
        rest = list(ndjson(resumed))
        chunks = received + rest
        assert chunks[-1]["done"] is True and chunks[-1]["eval_count"] == TOKENS
        assert "".join(c["message"]["content"] for c in chunks) == expected

    def test_another_tenant_cannot_read_the_job(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        _, stranger, _ = tenant_factory.create("free")
        response = httpx.post(
            f"{gateway.url}/api/chat", json=chat_body(num_predict=2), headers=auth(key), timeout=60
        )
        request_id = response.headers["x-request-id"]
        stolen = httpx.get(
            f"{gateway.url}/api/jobs/{request_id}/stream", headers=auth(stranger), timeout=30
        )
        assert stolen.status_code == 404
        mine = httpx.get(
            f"{gateway.url}/api/jobs/{request_id}/stream", headers=auth(key), timeout=30
        )
        assert list(ndjson(mine))[-1]["done"] is True  # a finished job can be re-read

    def test_after_past_the_end_is_a_clear_400(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        response = httpx.post(
            f"{gateway.url}/api/chat", json=chat_body(num_predict=2), headers=auth(key), timeout=60
        )
        request_id = response.headers["x-request-id"]
        past = httpx.get(
            f"{gateway.url}/api/jobs/{request_id}/stream",
            params={"after": 99},
            headers=auth(key),
            timeout=30,
        )
        assert past.status_code == 400 and "sent only" in past.json()["error"]


class TestSse:
    def test_resume_with_last_event_id(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": TOKENS,
            "seed": 5,
            "stream": True,
        }
        expected = whole_answer(gateway, key, chat_body("go", num_predict=TOKENS, seed=5))
        events, last_id = [], None
        with httpx.stream(
            "POST", f"{gateway.url}/v1/chat/completions", json=body, headers=auth(key), timeout=60
        ) as response:
            request_id = response.headers["x-request-id"]
            for line in response.iter_lines():
                if line.startswith("id: "):
                    last_id = line[4:]
                elif line.startswith("data: "):
                    events.append(json.loads(line[6:]))
                    if len(events) == 4:
                        break
        with httpx.stream(
            "GET",
            f"{gateway.url}/api/jobs/{request_id}/stream",
            headers=auth(key) | {"Last-Event-ID": last_id},
            timeout=120,
        ) as rest:
            tail = [line[6:] for line in rest.iter_lines() if line.startswith("data: ")]
        assert tail[-1] == "[DONE]"
        events += [json.loads(t) for t in tail[:-1]]
        text = "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"])
        assert text == expected
