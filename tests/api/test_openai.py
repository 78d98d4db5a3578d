"""The OpenAI-compatible API, through the official `openai` client, unchanged."""

import httpx
import openai
import pytest

from harness.helpers import MODEL, in_flight, png, usage_rows
from harness.processes import wait_for

pytestmark = pytest.mark.usefixtures("worker")


def client(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def image_message(text: str = "What is in this picture?", color: str = "red") -> dict:
    return {
        "role": "user",
        "content": [
            {"type": "text", "text": text},
            {
                "type": "image_url",
                "image_url": {"url": f"data:image/png;base64,{png(color=color)}"},
            },
        ],
    }


class TestChatCompletions:
    def test_non_streamed_chat_with_an_image(self, gateway, tenant_factory, sessions):
        _, key, _ = tenant_factory.create("pro")
        completion = client(gateway, key).chat.completions.create(
            model=MODEL, messages=[image_message()], max_tokens=7, temperature=0, seed=3
        )
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.role == "assistant"
        assert completion.choices[0].finish_reason == "length"
        assert completion.usage.completion_tokens == 7
        assert completion.usage.prompt_tokens > 576
        assert completion.usage.total_tokens == (
            completion.usage.prompt_tokens + completion.usage.completion_tokens
        )
        gpu_seconds = completion.usage.model_extra["gpu_seconds"]
        request_id = completion.id.removeprefix("chatcmpl-")
        [record] = usage_rows(sessions, request_id)
        assert record.gpu_seconds == pytest.approx(gpu_seconds, abs=1e-6)

    def test_streamed_chat_with_usage(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("pro")
        stream = client(gateway, key).chat.completions.create(
            model=MODEL,
            messages=[{"role": "system", "content": "Be brief."}, image_message()],
            max_completion_tokens=9,
            stream=True,
            stream_options={"include_usage": True},
        )
        chunks = list(stream)
        text_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
        assert text_chunks and text_chunks[0].choices[0].delta.role == "assistant"
        finals = [c for c in chunks if c.choices and c.choices[0].finish_reason]
        assert [c.choices[0].finish_reason for c in finals] == ["length"]
        usage_chunk = chunks[-1]
        assert usage_chunk.choices == [] and usage_chunk.usage.completion_tokens == 9
        assert usage_chunk.usage.model_extra["gpu_seconds"] > 0

    def test_same_seed_same_text_in_both_apis(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("pro")
        messages = [{"role": "user", "content": "hello"}]
        first = client(gateway, key).chat.completions.create(
            model=MODEL, messages=messages, max_tokens=8, seed=11, temperature=0.9, top_p=0.95
        )
        ollama_style = httpx.post(
            f"{gateway.url}/api/chat",
            json={
                "model": MODEL,
                "messages": messages,
                "stream": False,
                "options": {"num_predict": 8, "seed": 11, "temperature": 0.9, "top_p": 0.95},
            },
            headers={"Authorization": f"Bearer {key}"},
            timeout=60,
        ).json()
        assert first.choices[0].message.content == ollama_style["message"]["content"]

    def test_models_lists_every_hosted_model_with_its_kind(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        listed = client(gateway, key).models.list().data
        assert [(m.id, m.kind) for m in listed] == [(MODEL, "chat"), ("stable-diffusion", "image")]
        one = client(gateway, key).models.retrieve("stable-diffusion")
        assert (one.id, one.kind, one.object) == ("stable-diffusion", "image", "model")
        with pytest.raises(openai.NotFoundError):
            client(gateway, key).models.retrieve("gpt-17")


class TestErrorsAsTheClientExpects:
    def test_bad_key_is_an_authentication_error(self, gateway):
        with pytest.raises(openai.AuthenticationError) as caught:
            client(gateway, "gph_wrong").models.list()
        assert caught.value.body["type"] == "authentication_error"

    def test_unknown_model_is_not_found(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        with pytest.raises(openai.NotFoundError) as caught:
            client(gateway, key).chat.completions.create(
                model="gpt-17", messages=[{"role": "user", "content": "hi"}]
            )
        assert caught.value.body["param"] == "model"

    def test_out_of_range_parameter_names_the_field(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        with pytest.raises(openai.BadRequestError) as caught:
            client(gateway, key).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], temperature=3.5
            )
        assert caught.value.body["param"] == "temperature"

    @pytest.mark.parametrize(
        "asked, message",
        [
            ({"top_logprobs": 2}, "needs 'logprobs' set to true"),
            ({"logprobs": True, "top_logprobs": 21}, "less than or equal to 20"),
        ],
    )
    def test_bad_logprobs_are_refused_by_name(self, gateway, tenant_factory, asked, message):
        _, key, _ = tenant_factory.create("free")
        with pytest.raises(openai.BadRequestError) as caught:
            client(gateway, key).chat.completions.create(
                model=MODEL, messages=[{"role": "user", "content": "hi"}], **asked
            )
        assert caught.value.body["param"] == "top_logprobs"
        assert message in caught.value.body["message"]

    def test_n_answers_each_sampled_streamed_as_their_choices_and_billed_once(
        self, gateway, tenant_factory, sessions
    ):
        _, key, _ = tenant_factory.create("free")  # one slot: the answers share it
        api = client(gateway, key)
        asked = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 5,
            "temperature": 1.0,
            "seed": 21,
            "n": 3,
        }
        whole = api.chat.completions.with_raw_response.create(**asked)
        answer = whole.parse()
        texts = [c.message.content for c in answer.choices]
        assert [c.index for c in answer.choices] == [0, 1, 2]
        assert len(set(texts)) == 3  # each sampled on its own
        assert all(c.finish_reason == "length" for c in answer.choices)
        assert answer.usage.completion_tokens == 15
        [record] = usage_rows(sessions, whole.headers["x-request-id"])
        assert record.output_tokens == 15 and record.gpu_seconds > 0
        assert record.gpu_seconds == pytest.approx(answer.usage.gpu_seconds, abs=1e-6)
        # streamed: each answer's text as its choice, the same answers for the same seed
        streamed = [c for c in api.chat.completions.create(**asked, stream=True) if c.choices]
        by_index = {i: "" for i in range(3)}
        for chunk in streamed:
            by_index[chunk.choices[0].index] += chunk.choices[0].delta.content or ""
        assert [by_index[i] for i in range(3)] == texts
        ends = [c.choices[0].index for c in streamed if c.choices[0].finish_reason]
        assert sorted(ends) == [0, 1, 2]
        greedy = api.chat.completions.create(**asked | {"temperature": 0})
        assert len({c.message.content for c in greedy.choices}) == 1

    def test_n_with_tools_or_over_the_limit_is_refused(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        tool = {"type": "function", "function": {"name": "now", "parameters": {}}}
        for extra, message in (({"n": 2, "tools": [tool]}, "one answer"), ({"n": 9}, "8")):
            with pytest.raises(openai.BadRequestError) as caught:
                client(gateway, key).chat.completions.create(
                    model=MODEL, messages=[{"role": "user", "content": "hi"}], **extra
                )
            assert caught.value.body["param"] == "n"
            assert message in caught.value.body["message"]

    def test_logprobs_streamed_and_not_through_the_official_client(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        api = client(gateway, key)
        asked = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "hi"}],
            "max_tokens": 6,
            "temperature": 0,
            "logprobs": True,
            "top_logprobs": 3,
        }
        whole = api.chat.completions.create(**asked)
        content = whole.choices[0].logprobs.content
        assert len(content) == whole.usage.completion_tokens == 6
        joined = b"".join(bytes(token.bytes) for token in content)
        assert joined.decode(errors="replace") == whole.choices[0].message.content
        for token in content:
            assert len(token.top_logprobs) == 3 and token.logprob <= 0
            assert token.top_logprobs[0].token == token.token  # greedy: the likeliest
        streamed = [c for c in api.chat.completions.create(**asked, stream=True) if c.choices]
        scored = [
            t for c in streamed if c.choices[0].logprobs for t in c.choices[0].logprobs.content
        ]
        assert [t.model_dump() for t in scored] == [t.model_dump() for t in content]
        plain = api.chat.completions.create(**asked | {"logprobs": None, "top_logprobs": None})
        assert plain.choices[0].logprobs is None
        assert plain.choices[0].message.content == whole.choices[0].message.content

    def test_http_image_urls_are_refused_unless_enabled(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free")
        message = {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": "https://example.com/cat.png"}}],
        }
        with pytest.raises(openai.BadRequestError) as caught:
            client(gateway, key).chat.completions.create(model=MODEL, messages=[message])
        assert "only data: URLs are accepted" in caught.value.body["message"]

    def test_over_the_tier_is_a_rate_limit_error_with_retry_after(
        self, gateway, tenant_factory, redis_client
    ):
        tenant_id, key, _ = tenant_factory.create("free")
        api = client(gateway, key)
        stream = api.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "go"}],
            max_tokens=4000,
            stream=True,
        )
        next(iter(stream))
        with pytest.raises(openai.RateLimitError) as caught:
            api.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "x"}])
        assert caught.value.response.headers["retry-after"] == "1"
        stream.close()
        wait_for(lambda: in_flight(redis_client, tenant_id) == 0, 15, "the slot to be released")
