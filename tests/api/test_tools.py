"""Tool calls through the gateway with the official clients: offered tools reach the prompt,
`tool_choice` required or named makes the answer a valid call (a grammar), a call comes back
as `tool_calls` (OpenAI: finish_reason tool_calls; streamed too), and calls and tool results
go back in as turns."""

import json

import httpx
import jsonschema
import ollama
import openai
import pytest

from harness.helpers import MODEL, auth, chat_body
from tests.api.test_structured_output import Person

pytestmark = pytest.mark.usefixtures("worker")

WEATHER = {
    "type": "object",
    "properties": {
        "city": {"type": "string", "minLength": 1, "maxLength": 10},
        "unit": {"enum": ["celsius", "fahrenheit"]},
    },
    "required": ["city", "unit"],
    "additionalProperties": False,
}
TIME = {
    "type": "object",
    "properties": {"zone": {"enum": ["UTC", "CET"]}},
    "required": ["zone"],
    "additionalProperties": False,
}
TOOLS = [
    {
        "type": "function",
        "function": {"name": "get_weather", "description": "Weather now", "parameters": WEATHER},
    },
    {"type": "function", "function": {"name": "get_time", "parameters": TIME}},
]
SCHEMAS = {"get_weather": WEATHER, "get_time": TIME}


@pytest.fixture(scope="module")
def key(tenant_factory) -> str:
    return tenant_factory.create("max")[1]


def client(gateway, key) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def required_call(gateway, key, tools: list, seed: int):
    """A completion with tool_choice required."""
    return client(gateway, key).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "Do what you can."}],
        tools=tools,
        tool_choice="required",
        seed=seed,
        temperature=1.0,
        max_tokens=150,
    )


def test_openai_required_gives_a_valid_call_for_every_seed(gateway, key):
    for seed in range(4):
        choice = required_call(gateway, key, TOOLS, seed).choices[0]
        assert choice.finish_reason == "tool_calls"
        assert choice.message.content is None
        (call,) = choice.message.tool_calls
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), SCHEMAS[call.function.name])


def test_a_pydantic_model_as_parameters_its_definitions_and_all(gateway, key):
    """Parameters with `$defs` and references (as Pydantic writes them), two such tools: the
    call's grammar takes each tool's definitions along."""
    tools = [
        openai.pydantic_function_tool(Person, name="add_person"),
        openai.pydantic_function_tool(Person, name="update_person"),
    ]
    for seed in range(3):
        (call,) = required_call(gateway, key, tools, seed).choices[0].message.tool_calls
        assert call.function.name in ("add_person", "update_person")
        Person.model_validate_json(call.function.arguments)


def test_openai_named_function_streamed(gateway, key):
    stream = client(gateway, key).chat.completions.create(
        model=MODEL,
        messages=[{"role": "user", "content": "What time is it?"}],
        tools=TOOLS,
        tool_choice={"type": "function", "function": {"name": "get_time"}},
        seed=5,
        max_tokens=60,
        stream=True,
    )
    chunks = list(stream)
    deltas = [c.choices[0].delta for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    (delta,) = deltas
    (call,) = delta.tool_calls
    assert call.index == 0 and call.function.name == "get_time"
    jsonschema.validate(json.loads(call.function.arguments), TIME)
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


def test_a_resumed_call_stream_is_the_call_again(gateway, key):
    """A stream resumed after its connection dropped reads as it was first sent: the call in
    one event, then the finishing ones, with the same event ids."""
    body = {
        "model": MODEL,
        "messages": [{"role": "user", "content": "What time is it?"}],
        "tools": TOOLS,
        "tool_choice": {"type": "function", "function": {"name": "get_time"}},
        "seed": 5,
        "max_tokens": 60,
        "stream": True,
    }
    url = f"{gateway.url}/v1/chat/completions"
    first = httpx.post(url, json=body, headers=auth(key), timeout=60)
    sent = events(first.text)
    again = httpx.get(
        f"{gateway.url}/api/jobs/{first.headers['x-request-id']}/stream",
        headers=auth(key),
        timeout=60,
    )
    resumed = events(again.text)
    assert [i for i, _ in resumed] == [i for i, _ in sent]
    (call,) = [e for _, e in resumed if e["choices"][0]["delta"].get("tool_calls")]
    assert call["choices"][0]["delta"]["tool_calls"][0]["function"]["name"] == "get_time"
    after_call = httpx.get(
        f"{gateway.url}/api/jobs/{first.headers['x-request-id']}/stream",
        headers=auth(key) | {"Last-Event-ID": str(sent[0][0])},
        timeout=60,
    )
    rest = events(after_call.text)
    assert [i for i, _ in rest] == [i for i, _ in sent[1:]]
    assert not any(e["choices"][0]["delta"].get("tool_calls") for _, e in rest)


def events(text: str) -> list[tuple[int, dict]]:
    """(id, data) of each SSE event with a choice (a resumed stream adds a usage event)."""
    found, at = [], None
    for line in text.splitlines():
        if line.startswith("id: "):
            at = int(line.removeprefix("id: "))
        elif line.startswith("data: {"):
            event = json.loads(line.removeprefix("data: "))
            if event["choices"]:
                found.append((at, event))
    return found


def test_a_call_and_its_result_go_back_in(gateway, key):
    """The conversation goes on after a call: the assistant's call and the tool's result are
    turns of the prompt (it grows by them), and the answer is text again (tool_choice none)."""
    ask = [{"role": "user", "content": "Weather in Oslo?"}]
    call = {
        "id": "call_1",
        "type": "function",
        "function": {"name": "get_weather", "arguments": '{"city": "Oslo", "unit": "celsius"}'},
    }
    follow = ask + [
        {"role": "assistant", "content": None, "tool_calls": [call]},
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temperature": -3}'},
    ]
    api = client(gateway, key)
    first = api.chat.completions.create(
        model=MODEL, messages=ask, tools=TOOLS, tool_choice="none", max_tokens=3, seed=1
    )
    second = api.chat.completions.create(
        model=MODEL, messages=follow, tools=TOOLS, tool_choice="none", max_tokens=3, seed=1
    )
    assert second.choices[0].message.content and second.choices[0].finish_reason == "length"
    assert second.usage.prompt_tokens > first.usage.prompt_tokens + 20


def test_ollama_tools_a_call_comes_back_as_tool_calls(gateway, key):
    """Ollama lets the model choose; with `format` holding it to the call form, its answer
    is a call, returned as message.tool_calls (streamed: in one chunk, then the final one)."""
    call_schema = {
        "type": "object",
        "properties": {"name": {"const": "get_weather"}, "parameters": WEATHER},
        "required": ["name", "parameters"],
        "additionalProperties": False,
    }
    api = ollama.Client(host=gateway.url, headers=auth(key))
    messages = [{"role": "user", "content": "Weather in Rome?"}]
    options = {"seed": 2, "num_predict": 100}
    asked = {"model": MODEL, "messages": messages, "tools": TOOLS, "format": call_schema}
    answer = api.chat(**asked, options=options)
    (call,) = answer.message.tool_calls
    assert call.function.name == "get_weather" and answer.message.content == ""
    jsonschema.validate(dict(call.function.arguments), WEATHER)
    parts = list(api.chat(**asked, options=options, stream=True))
    assert parts[-1].done
    streamed = [p for p in parts if p.message.tool_calls]
    assert [p.message.tool_calls[0].function.arguments for p in streamed] == [
        call.function.arguments
    ]


def test_ollama_tools_answered_in_text_stay_text(gateway, key):
    answer = ollama.Client(host=gateway.url, headers=auth(key)).chat(
        model=MODEL,
        messages=[{"role": "user", "content": "Hello"}],
        tools=TOOLS,
        options={"seed": 1, "num_predict": 5},
    )
    assert answer.message.content and not answer.message.tool_calls


@pytest.mark.parametrize(
    "fields, message",
    [
        (
            {"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "nope"}}},
            "field 'tool_choice': auto, none, required or a function among the tools",
        ),
        ({"tools": TOOLS + TOOLS[:1]}, "field 'tools': two tools have the same name"),
        ({"tool_choice": "required"}, "field 'tool_choice': only with tools"),
        ({"tools": [{"type": "retrieval"}]}, "field 'tools[0]': only function tools"),
        (
            {"tools": [{"type": "function", "function": {"name": "bad name"}}]},
            "field 'tools[0].function.name'",
        ),
        (
            {"tools": TOOLS, "tool_choice": "required", "response_format": {"type": "json_object"}},
            "field 'response_format': not with a tool_choice that requires a call",
        ),
    ],
)
def test_bad_tools_are_refused_by_field(gateway, key, fields, message):
    body = {"model": MODEL, "messages": [{"role": "user", "content": "x"}]} | fields
    refused = httpx.post(f"{gateway.url}/v1/chat/completions", json=body, headers=auth(key))
    assert refused.status_code == 400
    assert message in refused.json()["error"]["message"]


def test_ollama_bad_tool_call_arguments_sent_back(gateway, key):
    body = chat_body() | {
        "messages": [
            {
                "role": "assistant",
                "content": "",
                "tool_calls": [{"function": {"name": "f", "arguments": "{not json"}}],
            }
        ]
    }
    refused = httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key))
    assert refused.status_code == 400
    assert "tool call to 'f': arguments are not JSON" in refused.json()["error"]
