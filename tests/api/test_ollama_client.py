"""The Ollama API through the official `ollama` Python client, unchanged."""

import ollama
import pytest

from tests.helpers import MODEL, png

pytestmark = pytest.mark.usefixtures("worker")


def client(gateway, key: str) -> ollama.Client:
    return ollama.Client(host=gateway.url, headers={"Authorization": f"Bearer {key}"})


def test_chat_with_an_image_streamed_and_not(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    api = client(gateway, key)
    message = {"role": "user", "content": "What is this?", "images": [png()]}
    whole = api.chat(model=MODEL, messages=[message], options={"num_predict": 5, "seed": 1})
    assert whole.done and whole.eval_count == 5
    parts = list(
        api.chat(
            model=MODEL, messages=[message], stream=True, options={"num_predict": 5, "seed": 1}
        )
    )
    assert parts[-1].done and parts[-1].eval_count == 5
    assert "".join(p.message.content for p in parts) == whole.message.content


def test_generate_and_list(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("free")
    api = client(gateway, key)
    answer = api.generate(model=MODEL, prompt="hi", options={"num_predict": 3})
    assert answer.done and answer.eval_count == 3
    assert f"{MODEL}:latest" in [m.model for m in api.list().models]


def test_errors_are_the_clients_response_errors(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("free")
    with pytest.raises(ollama.ResponseError) as caught:
        client(gateway, key).chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert "model 'nope' not found" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client(gateway, "gph_wrong").list()
    assert caught.value.status_code == 401
