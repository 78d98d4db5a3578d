"""The Ollama API through the official `ollama` Python client, unchanged."""

import ollama
import pytest

from harness.helpers import MODEL, png

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


def test_generate_gives_its_context_and_takes_it_back(gateway, tenant_factory):
    """Ollama's short conversational memory: a response's `context` (its exchange's token
    ids) sent with the next prompt puts that exchange first."""
    _, key, _ = tenant_factory.create("free")
    api = client(gateway, key)
    options = {"num_predict": 4, "seed": 2}
    first = api.generate(model=MODEL, prompt="Describe a lighthouse.", options=options)
    assert first.context and all(isinstance(token, int) for token in first.context)
    # the prompt's tokens, then the answer's: every one the request counted
    assert len(first.context) == first.prompt_eval_count + first.eval_count
    alone = api.generate(model=MODEL, prompt="And at night?", options=options)
    then = api.generate(model=MODEL, prompt="And at night?", context=first.context, options=options)
    assert then.prompt_eval_count > alone.prompt_eval_count + len(first.context) // 2
    assert len(then.context) == then.prompt_eval_count + then.eval_count
    streamed = list(api.generate(model=MODEL, prompt="hi", options=options, stream=True))
    assert streamed[-1].done and streamed[-1].context
    assert all(part.context is None for part in streamed[:-1])
    raw = api.generate(model=MODEL, prompt="hi", raw=True, options=options)
    assert raw.context is None  # a raw prompt keeps none, as Ollama's


@pytest.mark.parametrize(
    "fields, message",
    [
        ({"context": [10**9]}, "field 'context': 1000000000 is not a token of this model"),
        ({"context": [-1]}, "context"),
        ({"context": [1, 2], "raw": True}, "field 'context': not with raw"),
        ({"template": "{{ range .Messages }}{{ end }}"}, "'{{ range .Messages }}' is not"),
        ({"template": "{{ if .System }}S"}, "field 'template': an 'if' without its 'end'"),
        ({"template": "{{ .Prompt }}", "images": [png()]}, "field 'images': not with a template"),
        ({"template": "{{ .Prompt }}", "raw": True}, "field 'template': not with raw"),
    ],
)
def test_a_bad_context_is_refused_by_name(gateway, tenant_factory, fields, message):
    _, key, _ = tenant_factory.create("free")
    with pytest.raises(ollama.ResponseError) as caught:
        client(gateway, key).generate(model=MODEL, prompt="hi", **fields)
    assert caught.value.status_code == 400
    assert message in caught.value.error


def test_generate_with_its_own_template(gateway, tenant_factory):
    """The request's template instead of the model's: the prompt is what it makes of the
    system and the prompt, up to {{ .Response }}, and is the model's whole input."""
    _, key, _ = tenant_factory.create("free")
    api = client(gateway, key)
    options = {"num_predict": 3, "seed": 4}
    template = "{{ if .System }}{{ .System }}\n{{ end }}Q: {{ .Prompt }}\nA: {{ .Response }} (end)"
    templated = api.generate(model=MODEL, prompt="hi", template=template, options=options)
    raw = api.generate(model=MODEL, prompt="Q: hi\nA: ", raw=True, options=options)
    assert templated.response == raw.response
    assert templated.prompt_eval_count == raw.prompt_eval_count
    system = api.generate(
        model=MODEL, prompt="hi", system="Be brief.", template=template, options=options
    )
    raw = api.generate(model=MODEL, prompt="Be brief.\nQ: hi\nA: ", raw=True, options=options)
    assert system.response == raw.response


def test_errors_are_the_clients_response_errors(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("free")
    with pytest.raises(ollama.ResponseError) as caught:
        client(gateway, key).chat(model="nope", messages=[{"role": "user", "content": "x"}])
    assert caught.value.status_code == 404
    assert "model 'nope' not found" in caught.value.error
    with pytest.raises(ollama.ResponseError) as caught:
        client(gateway, "gph_wrong").list()
    assert caught.value.status_code == 401
