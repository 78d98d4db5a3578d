"""Structured output as the API families ask for it: Ollama's `format` ("json" or a JSON
Schema) and OpenAI's `response_format` (`json_object`, `json_schema`), as the
`OutputFormat` a job carries.

The engines decode under a grammar compiled from the schema (llguidance: in the transformers
engine, workers/engines/grammar.py, and as vLLM's structured-output backend), so every answer
that ends by itself parses and validates. A keyword the grammar cannot enforce is not ignored:
the engine refuses the request, naming it (400).
"""

import json
from typing import Any

from api.errors import BadRequest
from workers.contract import OutputFormat

MAX_SCHEMA_BYTES = 64 * 1024


def ollama_format(value: Any) -> OutputFormat | None:
    """`format`: absent or "" for text, "json" for a JSON object, or a JSON Schema."""
    if value in (None, ""):
        return None
    if value == "json":
        return OutputFormat(kind="json", field="format")
    if isinstance(value, dict):
        return _schema(value, "format")
    raise BadRequest("field 'format': \"json\" or a JSON schema (an object)")


def openai_response_format(value: Any) -> OutputFormat | None:
    """`response_format`: {"type": "text"}, {"type": "json_object"} or {"type": "json_schema",
    "json_schema": {"name", "schema", "strict"}} (`strict` or not, the schema is enforced)."""
    if value is None:
        return None
    kind = value.get("type") if isinstance(value, dict) else None
    if kind == "text":
        return None
    if kind == "json_object":
        return OutputFormat(kind="json", field="response_format")
    if kind != "json_schema":
        raise BadRequest(
            "field 'response_format': type must be text, json_object or json_schema",
            param="response_format",
        )
    spec = value.get("json_schema")
    field = "response_format.json_schema.schema"
    if not isinstance(spec, dict) or not isinstance(spec.get("schema"), dict):
        raise BadRequest(f"field '{field}': required, a JSON schema (an object)", param=field)
    return _schema(spec["schema"], field)


def _schema(schema: dict, field: str) -> OutputFormat:
    text = json.dumps(schema, separators=(",", ":"))
    if len(text.encode()) > MAX_SCHEMA_BYTES:
        raise BadRequest(
            f"field '{field}': the schema is {len(text.encode())} bytes; at most "
            f"{MAX_SCHEMA_BYTES}",
            param=field,
        )
    return OutputFormat(kind="json_schema", schema_text=text, field=field)
