"""Raw prompts, the chat template not applied: OpenAI's legacy /v1/completions through the
official client (streamed, echoed, resumed) and Ollama's `raw` on /api/generate."""

import json

import httpx
import openai
import pytest

from harness.helpers import MODEL, auth, png

pytestmark = pytest.mark.usefixtures("worker")
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def key(tenant_factory) -> str:
    return tenant_factory.create("pro")[1]


def client(gateway, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_a_completion_streamed_and_not(gateway, key):
    api = client(gateway, key)
    whole = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, seed=4)
    assert whole.object == "text_completion" and whole.id.startswith("cmpl-")
    (choice,) = whole.choices
    assert choice.text and choice.finish_reason == "length"
    assert whole.usage.completion_tokens == 6
    chunks = list(
        api.completions.create(
            model=MODEL,
            prompt=[PROMPT],
            max_tokens=6,
            seed=4,
            stream=True,
            stream_options={"include_usage": True},
        )
    )
    assert "".join(c.choices[0].text for c in chunks if c.choices) == choice.text
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].usage.completion_tokens == 6
    echoed = api.completions.create(model=MODEL, prompt=PROMPT, max_tokens=6, seed=4, echo=True)
    assert echoed.choices[0].text == PROMPT + choice.text


def test_a_completion_with_logprobs_in_the_legacy_shape(gateway, key):
    api = client(gateway, key)
    asked = {"model": MODEL, "prompt": PROMPT, "max_tokens": 5, "temperature": 0, "logprobs": 2}
    whole = api.completions.create(**asked, echo=True)
    (choice,) = whole.choices
    scored = choice.logprobs
    assert len(scored.tokens) == len(scored.token_logprobs) == len(scored.top_logprobs) == 5
    assert all(
        len(top) <= 2 and value <= 0
        for top, value in zip(scored.top_logprobs, scored.token_logprobs, strict=True)
    )
    assert scored.text_offset[0] == len(PROMPT)  # after the echoed prompt
    assert scored.text_offset == sorted(scored.text_offset)
    streamed = list(api.completions.create(**asked, stream=True))
    tokens = [
        t
        for c in streamed
        if c.choices and c.choices[0].logprobs
        for t in c.choices[0].logprobs.tokens
    ]
    assert tokens == scored.tokens
    assert api.completions.create(**asked | {"logprobs": None}).choices[0].logprobs is None


def test_n_completions_each_with_the_echoed_prompt(gateway, key):
    api = client(gateway, key)
    asked = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "seed": 5, "temperature": 1}
    whole = api.completions.create(**asked, n=2, echo=True)
    assert [c.index for c in whole.choices] == [0, 1]
    assert all(c.text.startswith(PROMPT) for c in whole.choices)
    assert whole.choices[0].text != whole.choices[1].text
    assert whole.usage.completion_tokens == 8
    streamed = list(api.completions.create(**asked, n=2, stream=True))
    texts = ["", ""]
    for chunk in streamed:
        texts[chunk.choices[0].index] += chunk.choices[0].text
    assert [PROMPT + t for t in texts] == [c.text for c in whole.choices]


def test_the_template_is_not_applied(gateway, key):
    """A raw prompt is the model's whole input: fewer tokens than the same words as a chat
    turn, which the template wraps in its headers."""

    def prompt_tokens(raw: bool) -> int:
        body = {"model": MODEL, "prompt": PROMPT, "raw": raw, "stream": False}
        body["options"] = {"num_predict": 1}
        answer = httpx.post(f"{gateway.url}/api/generate", json=body, headers=auth(key))
        assert answer.status_code == 200, answer.text
        return answer.json()["prompt_eval_count"]

    raw = prompt_tokens(True)
    assert raw < prompt_tokens(False) - 5
    completion = client(gateway, key).completions.create(model=MODEL, prompt=PROMPT, max_tokens=1)
    assert completion.usage.prompt_tokens == raw


def test_a_completion_stream_resumes_as_completion_events(gateway, key):
    body = {"model": MODEL, "prompt": PROMPT, "max_tokens": 4, "seed": 1}
    done = httpx.post(f"{gateway.url}/v1/completions", json=body, headers=auth(key), timeout=60)
    again = httpx.get(
        f"{gateway.url}/api/jobs/{done.headers['x-request-id']}/stream",
        headers=auth(key) | {"Last-Event-ID": "0"},
        timeout=60,
    )
    events = [
        json.loads(line.removeprefix("data: "))
        for line in again.text.splitlines()
        if line.startswith("data: {")
    ]
    assert {e["object"] for e in events} == {"text_completion"}
    first = done.json()["choices"][0]["text"]
    assert first.endswith("".join(e["choices"][0]["text"] for e in events if e["choices"]))


@pytest.mark.parametrize(
    "path, fields, message",
    [
        ("/v1/completions", {"suffix": "the end"}, "field 'suffix': not supported"),
        ("/v1/completions", {"logprobs": 6}, "field 'logprobs'"),
        ("/v1/completions", {"prompt": ["a", "b"]}, "field 'prompt': 2 prompts"),
        ("/v1/completions", {"prompt": ""}, "field 'prompt': empty"),
        ("/v1/completions", {"prompt": [""]}, "field 'prompt': empty"),
        ("/api/generate", {"raw": True, "images": [png()]}, "field 'images': not with raw"),
        ("/api/generate", {"raw": True, "system": "be nice"}, "field 'system': not with raw"),
    ],
)
def test_refused_by_field(gateway, key, path, fields, message):
    body = {"model": MODEL, "prompt": PROMPT} | fields
    refused = httpx.post(f"{gateway.url}{path}", json=body, headers=auth(key), timeout=30)
    assert refused.status_code == 400, refused.text
    error = refused.json()["error"]
    assert message in (error["message"] if isinstance(error, dict) else error)
