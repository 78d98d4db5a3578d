"""JSON request bodies read whatever their Content-Type says.

Ollama's server ignores Content-Type, and so do its users' scripts (`curl -d '{...}'` sends
application/x-www-form-urlencoded); FastAPI's body parameters would refuse those.
"""

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
