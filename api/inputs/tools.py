"""Tool calls, as both API families ask for them: the tools a request offers, what it lets
the model do with them (`tool_choice`), and the answer read back as calls.

A call is Llama 3.1's JSON form, `{"name": ..., "parameters": {...}}`: the model's chat
template shows the tools when it knows how (its `tools` variable), or the worker's fallback
turn does (workers/engines/llava_requests.py). With `tool_choice` `required`, or a function
named, the answer is decoded under a grammar that admits only a call to one of them with
parameters valid against its schema (api/inputs/output_format.py's path); with `auto` the model
chooses, and an answer that is such a call (the whole of it) is returned as one.
"""

import json
import uuid
from collections.abc import AsyncIterator
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from api.errors import BadRequest
from api.pipeline.stream import Chunk
from workers.contract import OutputFormat, TokenChunk, ToolSpec, merged

MAX_TOOLS = 64


class Function(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$")
    description: str = Field("", max_length=4000)
    parameters: dict = Field(default_factory=lambda: {"type": "object", "properties": {}})


def tool_specs(tools: list[Any] | None, field: str = "tools") -> list[ToolSpec]:
    """The offered tools (`[{"type": "function", "function": {...}}]`, both families)."""
    if not tools:
        return []
    if len(tools) > MAX_TOOLS:
        raise BadRequest(f"field '{field}': {len(tools)} tools; at most {MAX_TOOLS}", param=field)
    specs = []
    for index, tool in enumerate(tools):
        where = f"{field}[{index}]"
        if not isinstance(tool, dict) or tool.get("type", "function") != "function":
            raise BadRequest(f"field '{where}': only function tools are supported", param=field)
        try:
            function = Function.model_validate(tool.get("function"))
        except ValidationError as exc:
            problem = exc.errors()[0]
            place = ".".join(str(p) for p in problem["loc"])
            raise BadRequest(
                f"field '{where}.function{'.' + place if place else ''}': {problem['msg']}",
                param=field,
            ) from None
        specs.append(
            ToolSpec(
                name=function.name,
                description=function.description,
                parameters=json.dumps(function.parameters, separators=(",", ":")),
            )
        )
    names = [s.name for s in specs]
    if len(set(names)) < len(names):
        raise BadRequest(f"field '{field}': two tools have the same name", param=field)
    return specs


def choice_format(specs: list[ToolSpec], choice: Any) -> OutputFormat | None:
    """The grammar `tool_choice` asks for: none for `auto`/`none` (or no tools), a call to
    any tool for `required`, to the named one for `{"type": "function", "function":
    {"name"}}` (OpenAI) or a bare name."""
    if choice in (None, "auto", "none"):
        return None
    if not specs:
        raise BadRequest("field 'tool_choice': only with tools", param="tool_choice")
    if choice == "required":
        chosen = specs
    else:
        name = choice.get("function", {}).get("name") if isinstance(choice, dict) else choice
        chosen = [s for s in specs if s.name == name]
        if not isinstance(name, str) or not chosen:
            raise BadRequest(
                "field 'tool_choice': auto, none, required or a function among the tools",
                param="tool_choice",
            )
    calls, definitions = [], {}
    for spec in chosen:
        parameters = _rerooted(json.loads(spec.parameters), spec.name, definitions)
        calls.append(
            {
                "type": "object",
                "properties": {"name": {"const": spec.name}, "parameters": parameters},
                "required": ["name", "parameters"],
                "additionalProperties": False,
            }
        )
    schema = calls[0] if len(calls) == 1 else {"anyOf": calls}
    if definitions:
        schema = {"$defs": definitions} | schema
    return OutputFormat(kind="json_schema", schema_text=json.dumps(schema), field="tools")


def _rerooted(parameters: Any, tool: str, definitions: dict) -> Any:
    """A tool's parameters schema, nested in the call's: its definitions (`$defs`,
    `definitions`; Pydantic models have them) move to the root as `<tool>.<name>`, and its
    references follow them (a reference to the whole of it, "#", too)."""
    if not isinstance(parameters, dict):
        return parameters
    own = {**parameters.pop("definitions", {}), **parameters.pop("$defs", {})}
    whole, recursive = f"#/$defs/{tool}", []

    def moved(node: Any) -> Any:
        if isinstance(node, list):
            return [moved(item) for item in node]
        if not isinstance(node, dict):
            return node
        node = {key: moved(value) for key, value in node.items()}
        ref = node.get("$ref")
        if isinstance(ref, str) and ref == "#":
            node["$ref"] = whole
            recursive.append(True)
        elif isinstance(ref, str) and ref.startswith(("#/$defs/", "#/definitions/")):
            node["$ref"] = f"#/$defs/{tool}.{ref.split('/', 2)[2]}"
        return node

    for name, definition in own.items():
        definitions[f"{tool}.{name}"] = moved(definition)
    rerooted = moved(parameters)
    if recursive:
        definitions[tool] = rerooted
    return rerooted


def read_call(text: str, specs: list[ToolSpec], call_id: str | None = None) -> dict | None:
    """The call the answer is, if the whole of it is one to an offered tool: {"id", "name",
    "arguments" (a dict)}; else None (the answer is text). `call_id`: the same each time the
    answer is read (an async job's), else a new one."""
    if not specs or not text.strip().startswith("{"):
        return None
    try:
        value = json.loads(text)
    except ValueError:
        return None
    if not isinstance(value, dict) or value.get("name") not in {s.name for s in specs}:
        return None
    arguments = value.get("parameters", value.get("arguments", {}))
    if not isinstance(arguments, dict):
        return None
    call_id = call_id or f"call_{uuid.uuid4().hex[:24]}"
    return {"id": call_id, "name": value["name"], "arguments": arguments}


def turn_text(content: str, calls: list[tuple[str, Any]]) -> str:
    """An assistant turn as the model reads it: its text, then the calls it made (name,
    arguments), one a line."""
    return "\n".join(filter(None, [content, *(call_text(n, a) for n, a in calls)]))


def call_text(name: str, arguments: Any) -> str:
    """An earlier call, as the assistant turn that made it reads to the model."""
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except ValueError:
            raise BadRequest(
                f"tool call to '{name}': arguments are not JSON", param="messages"
            ) from None
    return json.dumps({"name": name, "parameters": arguments})


def openai_call(call: dict) -> dict:
    """A call read back (`read_call`) in OpenAI's form, its arguments as JSON text."""
    function = {"name": call["name"], "arguments": json.dumps(call["arguments"])}
    return {"id": call["id"], "type": "function", "function": function}


async def gathered(chunks: AsyncIterator[Chunk]) -> AsyncIterator[Chunk]:
    """The stream with its text held back and handed on whole, as one chunk before the final
    one: with tools offered, whether the answer is a call is known only once it is whole."""
    held: list[TokenChunk] = []
    async for chunk in chunks:
        if isinstance(chunk, TokenChunk):
            held.append(chunk)
            continue
        if held:
            yield merged(held)
            held = []
        yield chunk
