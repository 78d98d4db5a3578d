"""JSON request bodies read whatever their Content-Type says.

Ollama's server ignores Content-Type, and so do its users' scripts (`curl -d '{...}'` sends
application/x-www-form-urlencoded); FastAPI's body parameters would refuse those.
"""

import copy
from typing import TypeVar

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from pydantic import BaseModel, ValidationError

M = TypeVar("M", bound=BaseModel)


def json_body(model: type[M]):
    async def parse(request: Request) -> M:
        raw = await request.body()
        if not raw.strip():
            raise RequestValidationError(
                [
                    {
                        "type": "missing",
                        "loc": ("body",),
                        "msg": "request body is empty; expected JSON",
                    }
                ]
            )
        try:
            return model.model_validate_json(raw)
        except ValidationError as exc:
            raise RequestValidationError(exc.errors(include_url=False)) from None

    return parse


def validated(model: type[M], data: dict, under: tuple[str, ...] = ()) -> M:
    """`data` (a part of a body `json_body` already parsed) as `model`; its errors name their
    fields under `under`, as the body's own errors do."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors(include_url=False)
        for error in errors:
            error["loc"] = (*under, *error["loc"])
        raise RequestValidationError(errors) from None


def openapi_body(model: type[BaseModel]) -> dict:
    """`openapi_extra` documenting `model` as the route's JSON body (parsed by `json_body`).

    Pydantic's schema keeps nested models under "$defs" and points at them with "#/$defs/..."
    references, which resolve against the root of the whole OpenAPI document, not this schema:
    they are inlined here so that clients and generators see the full body.
    """
    schema = model.model_json_schema()
    definitions = schema.pop("$defs", {})

    def inline(node, depth: int = 0):
        if depth > 32:
            raise ValueError(f"{model.__name__}'s schema nests too deeply to inline")
        if isinstance(node, dict):
            ref = node.get("$ref", "")
            if ref.startswith("#/$defs/"):
                target = copy.deepcopy(definitions[ref.removeprefix("#/$defs/")])
                rest = {k: v for k, v in node.items() if k != "$ref"}
                return inline(target | rest, depth + 1)
            if "propertyName" in node and "mapping" in node:  # a discriminator: its mapping
                return {"propertyName": node["propertyName"]}  # names the inlined $defs
            return {key: inline(value, depth) for key, value in node.items()}
        if isinstance(node, list):
            return [inline(item, depth) for item in node]
        return node

    return {
        "requestBody": {
            "required": True,
            "content": {"application/json": {"schema": inline(schema)}},
        }
    }
