"""Structured output through the gateway with the official clients: Ollama's `format` (a JSON
schema from a Pydantic model, or "json") and OpenAI's `response_format` (a Pydantic model
through `chat.completions.parse`, `json_object`); every answer parses and validates, streamed
or not, and a schema the grammar cannot enforce is refused naming the keyword."""

import json
from typing import Literal

import httpx
import ollama
import openai
import pytest
from pydantic import BaseModel, ConfigDict, Field

from harness.helpers import MODEL, auth, chat_body, png

pytestmark = pytest.mark.usefixtures("worker")


class Pet(BaseModel):
    model_config = ConfigDict(extra="forbid")

    legs: int = Field(ge=0, le=8)


class Person(BaseModel):
    model_config = ConfigDict(extra="forbid")  # additionalProperties: false

    name: str = Field(min_length=1, max_length=12)
    age: int = Field(ge=0, le=120)
    colour: Literal["red", "green", "blue"]
    pet: Pet | None


@pytest.fixture(scope="module")
def key(tenant_factory) -> str:
    return tenant_factory.create("max")[1]


def test_ollama_format_from_a_pydantic_model_validates_for_every_seed(gateway, key):
    api = ollama.Client(host=gateway.url, headers=auth(key))
    message = {"role": "user", "content": "Who is in this picture?", "images": [png()]}
    for seed in range(6):
        options = {"seed": seed, "temperature": 1.0, "num_predict": 200}
        answer = api.chat(
            model=MODEL, messages=[message], format=Person.model_json_schema(), options=options
        )
        assert answer.done_reason == "stop"
        Person.model_validate_json(answer.message.content)
        parts = list(
            api.chat(
                model=MODEL,
                messages=[message],
                format=Person.model_json_schema(),
                options=options,
                stream=True,
            )
        )
        assert len(parts) > 2 and parts[-1].done
        assert "".join(p.message.content for p in parts) == answer.message.content


def test_ollama_generate_with_a_schema(gateway, key):
    api = ollama.Client(host=gateway.url, headers=auth(key))
    answer = api.generate(
        model=MODEL,
        prompt="A pet, as JSON.",
        format=Pet.model_json_schema(),
        options={"seed": 3, "num_predict": 50},
    )
    assert Pet.model_validate_json(answer.response)


def test_openai_parse_with_a_pydantic_model(gateway, key):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)
    for seed in range(3):
        completion = client.chat.completions.parse(
            model=MODEL,
            messages=[{"role": "user", "content": "Describe a person."}],
            response_format=Person,
            seed=seed,
            temperature=1.0,
            max_tokens=200,
        )
        choice = completion.choices[0]
        assert choice.finish_reason == "stop"
        assert isinstance(choice.message.parsed, Person)


def test_openai_json_object_streamed(gateway, key):
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)
    stream = client.chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Some JSON, please."}],
        response_format={"type": "json_object"},
        max_tokens=30,
        seed=2,
        stream=True,
    )
    text = "".join(chunk.choices[0].delta.content or "" for chunk in stream if chunk.choices)
    assert text.startswith("{")


def test_a_keyword_the_grammar_cannot_enforce_is_refused_by_name(gateway, key):
    schema = {"type": "object", "properties": {"a": {"not": {"type": "string"}}}}
    for stream in (False, True):
        refused = httpx.post(
            f"{gateway.url}/api/chat",
            json=chat_body() | {"format": schema, "stream": stream},
            headers=auth(key),
            timeout=60,
        )
        assert refused.status_code == 400, refused.text
        error = refused.json()["error"]
        assert error.startswith("field 'format': the JSON schema cannot be used")
        assert '"not"' in error, error
    client = openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)
    with pytest.raises(openai.BadRequestError) as refused:
        client.chat.completions.create(
            model=MODEL,
            messages=[{"role": "user", "content": "x"}],
            response_format={
                "type": "json_schema",
                "json_schema": {"name": "x", "schema": json.loads(json.dumps(schema))},
            },
        )
    assert "field 'response_format.json_schema.schema'" in str(refused.value)
