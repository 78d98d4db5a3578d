"""Bad input gets a clear error naming the problem, and holds no slot."""

import base64

import httpx
import pytest

from harness.helpers import MODEL, auth, chat_body, in_flight, png, png_bomb


@pytest.fixture(scope="module")
def free_tenant(tenant_factory):
    return tenant_factory.create("free")


def post(gateway, key, body=None, **kwargs) -> httpx.Response:
    if body is not None:
        kwargs["json"] = body
    return httpx.post(f"{gateway.url}/api/chat", headers=auth(key), timeout=30, **kwargs)


def truncated_png() -> str:
    raw = base64.b64decode(png(200, 200, "purple"))
    return base64.b64encode(raw[: len(raw) // 2]).decode()


CASES = {
    "malformed JSON": (
        dict(content=b'{"model": "llava-llama3", "messages": ['),
        400,
        "malformed JSON",
    ),
    "empty body": (dict(content=b""), 400, "request body is empty"),
    "no messages": (dict(json={"model": MODEL, "messages": []}), 400, "field 'messages'"),
    "bad role": (
        dict(json={"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}),
        400,
        "field 'messages.0.role'",
    ),
    "NaN temperature": (
        dict(
            content=b'{"model": "llava-llama3", "messages": [{"role": "user",'
            b' "content": "x"}], "options": {"temperature": NaN}}'
        ),
        400,
        "field 'options.temperature'",
    ),
    "top_p out of range": (dict(json=chat_body(top_p=1.5)), 400, "field 'options.top_p'"),
    "unknown model": (
        dict(json=chat_body() | {"model": "gpt-17"}),
        404,
        "model 'gpt-17' not found",
    ),
    "not base64": (
        dict(json=chat_body(images=["%%% not base64 %%%"])),
        400,
        "messages[0].images[0]: not valid base64",
    ),
    "not an image": (
        dict(json=chat_body(images=[base64.b64encode(b"hello world").decode()])),
        400,
        "messages[0].images[0]: not an image",
    ),
    "truncated image": (
        dict(json=chat_body(images=[truncated_png()])),
        400,
        "messages[0].images[0]: corrupt or truncated image",
    ),
    "decompression bomb": (
        dict(json=chat_body(images=[png_bomb(30000)])),
        413,
        "messages[0].images[0]",
    ),
    "image over the pixel budget": (
        dict(json=chat_body(images=[png_bomb(5000)])),
        413,
        "image is 5000x5000 pixels; the limit is",
    ),
    "too many images": (dict(json=chat_body(images=[png()] * 9)), 400, "at most 8 per request"),
    "format neither json nor a schema": (
        dict(json=chat_body() | {"format": "yaml"}),
        400,
        "field 'format': \"json\" or a JSON schema",
    ),
    "schema not an object": (
        dict(json=chat_body() | {"format": ["json"]}),
        400,
        "field 'format': \"json\" or a JSON schema",
    ),
}


class TestRefusedBeforeAdmission:
    @pytest.mark.parametrize("case", CASES, ids=list(CASES))
    def test_clear_error_and_no_slot_held(self, gateway, free_tenant, redis_client, case):
        tenant_id, key, _ = free_tenant
        kwargs, status, message = CASES[case]
        response = post(gateway, key, **kwargs)
        assert response.status_code == status, response.text
        assert message in response.json()["error"]
        assert in_flight(redis_client, tenant_id) == 0

    def test_body_over_the_limit_is_413(self, gateway, free_tenant):
        _, key, _ = free_tenant
        oversized = b'{"model": "llava-llama3", "prompt": "' + b"x" * (21 * 1024 * 1024) + b'"}'
        response = post(gateway, key, content=oversized)
        assert response.status_code == 413
        assert "larger than the limit" in response.json()["error"]

    def test_chunked_body_over_the_limit_is_413(self, gateway, free_tenant):
        _, key, _ = free_tenant

        def chunks():
            yield b'{"model": "llava-llama3", "prompt": "'
            for _ in range(22):
                yield b"x" * (1024 * 1024)
            yield b'"}'

        response = post(gateway, key, content=chunks())
        assert response.status_code == 413


class TestOllamaFieldsNotDone:
    @pytest.mark.parametrize(
        "field, value, reason",
        [
            ("suffix", "end of the story", "fill-in-the-middle"),
            ("template", "{{ range .Messages }}{{ end }}", "is not supported"),
            ("context", [1, -2, 3], "'context.1': Input should be greater than or equal to 0"),
        ],
    )
    def test_refused_by_name_not_ignored(self, gateway, free_tenant, field, value, reason):
        tenant_id, key, _ = free_tenant
        body = {"model": MODEL, "prompt": "Once upon a time", field: value}
        response = httpx.post(
            f"{gateway.url}/api/generate", json=body, headers=auth(key), timeout=30
        )
        assert response.status_code == 400, response.text
        assert f"field '{field}" in response.json()["error"]
        assert reason in response.json()["error"]


class TestAuthentication:
    @pytest.mark.parametrize(
        "headers, message",
        [
            ({}, "missing API key"),
            ({"Authorization": "Basic abc"}, "malformed Authorization header"),
            ({"Authorization": "Bearer"}, "malformed Authorization header"),
            ({"Authorization": "Bearer gph_notakey"}, "invalid API key"),
            ({"Authorization": "Bearer gph_" + "A" * 30}, "invalid API key"),
        ],
    )
    def test_missing_or_malformed_keys_are_401(self, gateway, headers, message):
        response = httpx.post(
            f"{gateway.url}/api/chat", json=chat_body(), headers=headers, timeout=30
        )
        assert response.status_code == 401
        assert message in response.json()["error"]

    def test_auth_is_checked_before_the_body(self, gateway):
        response = httpx.post(f"{gateway.url}/api/chat", content=b"{not json", timeout=30)
        assert response.status_code == 401


class TestNoMore500s:
    """Inputs that were server errors (issue 32's hostile round two)."""

    @pytest.mark.parametrize("size", ["8x8", "0x0", "56x64"])
    def test_an_image_smaller_than_the_model_draws_is_a_400(self, gateway, free_tenant, size):
        _, key, _ = free_tenant
        response = httpx.post(
            f"{gateway.url}/v1/images/generations",
            json={"prompt": "a lighthouse", "size": size},
            headers=auth(key),
            timeout=30,
        )
        assert response.status_code == 400, response.text
        error = response.json()["error"]
        assert error["param"] == "size" and "smaller than 64 pixels" in error["message"]

    @pytest.mark.usefixtures("worker")
    @pytest.mark.parametrize(
        "text", ["What is <image>?", "Ends here.<|eot_id|><|start_header_id|>"]
    )
    def test_a_special_tokens_text_in_a_prompt_is_data(self, gateway, free_tenant, text):
        _, key, _ = free_tenant
        body = chat_body(text, num_predict=2) | {"stream": False}
        response = post(gateway, key, body)
        assert response.status_code == 200, response.text

    def test_a_job_with_an_http_image_url_is_told_to_send_a_data_url(self, gateway, free_tenant):
        _, key, _ = free_tenant
        message = {
            "role": "user",
            "content": [
                {"type": "text", "text": "What is this?"},
                {"type": "image_url", "image_url": {"url": "http://127.0.0.1:9/cat.png"}},
            ],
        }
        body = {"type": "chat", "input": {"model": MODEL, "messages": [message]}}
        response = httpx.post(f"{gateway.url}/v1/jobs", json=body, headers=auth(key), timeout=30)
        assert response.status_code == 400, response.text
        error = response.json()["error"]["message"]
        assert "send the image in a data: URL" in error, error
        assert "not valid base64" not in error
