"""Errors carry their HTTP status; one handler renders them in the API family's shape."""

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from fastapi.routing import APIRoute
from pydantic import BaseModel
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy import exc as db
from starlette.exceptions import HTTPException as StarletteHTTPException

from billing.db import database_away

# The 503 for a route that found the database out of reach (billing.db.database_away).
DATABASE_AWAY_MESSAGE = "the database is unavailable; try again shortly"
REDIS_AWAY_MESSAGE = "the job store (Redis) is unavailable; try again shortly"
# Redis out of reach (restarting, loading, partitioned, too slow): an outage, to retry. Any
# other RedisError is a command Redis refused (a wrong argument, a server too old): a bug, a
# 500 with its traceback in the log, never a 503 that tells the client to retry.
REDIS_AWAY = (RedisConnectionError, RedisTimeoutError)


class ApiError(Exception):
    status = 500
    code = "internal_error"

    def __init__(
        self, message: str, headers: dict[str, str] | None = None, param: str | None = None
    ):
        super().__init__(message)
        self.message = message
        self.headers = headers or {}
        self.param = param  # the request field at fault, when there is one


class BadRequest(ApiError):
    status, code = 400, "invalid_request"


class Unauthorized(ApiError):
    status, code = 401, "invalid_api_key"


class PaymentRequired(ApiError):
    status, code = 402, "quota_exceeded"


class Forbidden(ApiError):
    status, code = 403, "insufficient_scope"


class NotFound(ApiError):
    status, code = 404, "not_found"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PayloadTooLarge(ApiError):
    status, code = 413, "payload_too_large"


class TooManyRequests(ApiError):
    status, code = 429, "concurrency_limit"


class ClientGone(ApiError):
    """The client disconnected before there was anything to answer (nginx's 499)."""

    status, code = 499, "client_closed_request"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


class GatewayTimeout(ApiError):
    status, code = 504, "timeout"


class UpstreamError(ApiError):
    """An error a worker reported, with the status it chose."""

    code = "model_error"

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


def error_body(message: str) -> dict:
    """Ollama's error shape."""
    return {"error": message}


OPENAI_TYPES = {
    401: "authentication_error",
    402: "insufficient_quota",
    403: "permission_error",
    429: "rate_limit_error",
}


def error_body_openai(
    status: int, message: str, param: str | None = None, code: str | None = None
) -> dict:
    """OpenAI's error shape; its clients turn the status into their own exception types."""
    kind = OPENAI_TYPES.get(status, "invalid_request_error" if status < 500 else "server_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class OpenAIError(BaseModel):
    """An error on an OpenAI-style route, as OpenAI's clients read it."""

    error: OpenAIErrorDetail


class OllamaError(BaseModel):
    """An error on an Ollama-style route (and this server's own native ones)."""

    error: str


class OpenAIRoute(APIRoute):
    """A route of the OpenAI family: its errors are `OpenAIError`s."""

    error_family = "openai"


class OllamaRoute(APIRoute):
    """A route of the Ollama family (and the native ones beside it): `OllamaError`s."""

    error_family = "ollama"


# What a family's routers declare for their errors (documented in /openapi.json).
OPENAI_ERRORS: dict = {"default": {"model": OpenAIError, "description": "an error"}}
OLLAMA_ERRORS: dict = {"default": {"model": OllamaError, "description": "an error"}}


def family(scope) -> str:
    """The error family of the route a request reached; one answered before any route (a
    middleware's refusal, an unknown path) by its path: OpenAI's under /v1/, else Ollama's."""
    route = scope.get("route")
    known = getattr(route, "error_family", None)
    if known is not None:
        return known
    return "openai" if scope.get("path", "").startswith("/v1/") else "ollama"


def error_response(
    scope,
    status: int,
    message: str,
    headers: dict[str, str] | None = None,
    param: str | None = None,
    code: str | None = None,
) -> JSONResponse:
    """An error in the shape of the family of the route the request reached (`family`); also
    an ASGI app, for middleware that answers before the routes."""
    if family(scope) == "openai":
        body = error_body_openai(status, message, param, code)
    else:
        body = error_body(message)
    return JSONResponse(body, status_code=status, headers=headers)


def _first_field(exc: RequestValidationError) -> str | None:
    for error in exc.errors():
        location = _location(error)
        if location and error.get("type") != "json_invalid":
            return ".".join(location)
    return None


SOURCES = ("body", "query", "path", "header")


def _location(error: dict) -> list[str]:
    """Where a validation error is, without FastAPI's leading 'body'/'query'/... part."""
    location = [str(part) for part in error.get("loc", ())]
    return location[1:] if location and location[0] in SOURCES else location


def _describe_validation(exc: RequestValidationError) -> str:
    problems = []
    for error in exc.errors():
        location = _location(error)
        if error.get("type") == "json_invalid":
            problems.append(f"malformed JSON: {error.get('ctx', {}).get('error', error['msg'])}")
        elif location:
            problems.append(f"field '{'.'.join(location)}': {error['msg']}")
        else:
            problems.append(error["msg"])
    return "invalid request: " + "; ".join(problems)


def install(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error_response(
            request.scope, exc.status, exc.message, exc.headers, exc.param, exc.code
        )

    @app.exception_handler(RequestValidationError)
    async def invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        message = _describe_validation(exc)
        return error_response(
            request.scope, 400, message, param=_first_field(exc), code="invalid_request"
        )

    async def database_outage(request: Request, exc: Exception) -> JSONResponse:
        if not database_away(exc):
            raise exc  # a bug, not an outage: the server error it is
        headers = {"Retry-After": "1"}
        return error_response(
            request.scope, 503, DATABASE_AWAY_MESSAGE, headers, code="unavailable"
        )

    # SQLAlchemy's errors only: a ConnectionError elsewhere (storage, say) is not the database's
    for kind in (db.OperationalError, db.InterfaceError, db.TimeoutError, db.DBAPIError):
        app.add_exception_handler(kind, database_outage)

    async def redis_outage(request: Request, exc: Exception) -> JSONResponse:
        """Redis restarting or unreachable, anywhere a request reads it (slots, job records,
        streams): a 503 to retry, not a server error."""
        headers = {"Retry-After": "1"}
        return error_response(request.scope, 503, REDIS_AWAY_MESSAGE, headers, code="unavailable")

    for kind in REDIS_AWAY:
        app.add_exception_handler(kind, redis_outage)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        return error_response(
            request.scope, exc.status_code, str(exc.detail), getattr(exc, "headers", None)
        )
