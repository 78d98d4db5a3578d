"""ASGI middleware that refuses a URL holding a NUL byte (UrlGuard), and reads a request body
only for a caller it knows, only up to a limit, and only while it keeps coming (BodyGuard):

- A request that presents a bearer credential is authenticated before a byte of its body is
  read: an unknown key gets its 401 at once (a known one is handed on, not looked up again).
- A request without one (the dashboard's forms, Stripe's events) may send at most
  `anonymous_max_bytes`: a stranger cannot make the gateway hold more.
- A body must keep arriving: a pause of `idle_seconds`, or less than `min_bytes_per_second`
  on average once `grace_seconds` have passed, ends it with 408 (a slow-loris body).
- One client address may be sending at most `bodies_per_client` bodies at once (429 beyond).
- A body over `SPOOL_BYTES` is kept in a temporary file, not in memory, until the app reads it.
"""

import tempfile
import time
from collections import Counter
from urllib.parse import parse_qsl

import anyio
from prometheus_client import Gauge
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.deps import KEY_OWNER, bearer, client_address, is_admin_token, owner_of_key_header
from api.errors import ApiError, BadRequest, error_response

SPOOL_BYTES = 1024 * 1024
REPLAY_CHUNK = 64 * 1024


class BodyGuard:
    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        uploads: dict[str, int] | None = None,
        anonymous_max_bytes: int = SPOOL_BYTES,
        idle_seconds: float = 10.0,
        grace_seconds: float = 10.0,
        min_bytes_per_second: float = 16 * 1024,
        bodies_per_client: int = 16,
        reading: Gauge | None = None,  # counts the bodies being received
    ):
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = uploads or {}  # path: its own (larger) limit, e.g. dataset uploads
        self.anonymous_max_bytes = anonymous_max_bytes
        self.idle_seconds = idle_seconds
        self.grace_seconds = grace_seconds
        self.min_rate = min_bytes_per_second
        self.bodies_per_client = bodies_per_client
        self.reading = reading
        self._sending: Counter[str] = Counter()  # client address: bodies being read

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        try:
            limit = await self._limit(scope)
            body = await self._read(scope, receive, limit)
        except ApiError as exc:
            await _answer(exc, scope, receive, send)
            return
        if body is None:  # the client left
            return
        if isinstance(body, dict):  # the whole body came in one message: handed on as it is
            await self.app(scope, _once(body, receive), send)
            return
        with body:
            await self.app(scope, _replay(body, receive), send)

    async def _limit(self, scope: Scope) -> int:
        """The body limit for this caller; authenticates a bearer credential first."""
        limit = self.uploads.get(scope["path"], self.max_bytes)
        headers = Headers(scope=scope)
        header = headers.get("authorization", "")
        presented = bearer(header)
        state = scope["state"]["gpuhost"]
        if not presented:
            limit = min(limit, self.anonymous_max_bytes)
        elif not is_admin_token(state.settings, presented):
            address = client_address(scope)
            scope["state"][KEY_OWNER] = await owner_of_key_header(state, header, address)
        declared = headers.get("content-length", "")
        if declared.isdigit() and int(declared) > limit:
            raise _TooLarge(limit)
        return limit

    async def _read(self, scope: Scope, receive: Receive, limit: int):
        """The whole body: its one message when it came in one (most do), else in a (spooled)
        file; None if the client disconnected."""
        client = client_address(scope)
        if self._sending[client] >= self.bodies_per_client:
            raise _Refused(
                429,
                f"this address is already sending {self.bodies_per_client} request bodies; "
                "wait for one to finish",
                "too_many_uploads",
                {"Retry-After": "1"},
            )
        self._sending[client] += 1
        if self.reading is not None:
            self.reading.inc()
        body = None
        try:
            size, started, more = 0, time.monotonic(), True
            while more:
                message = None
                with anyio.move_on_after(self.idle_seconds):
                    message = await receive()
                if message is None:
                    raise _TooSlow(f"no part of the request body came for {self.idle_seconds:g} s")
                if message["type"] == "http.disconnect":
                    if body is not None:
                        body.close()
                    return None
                chunk = message.get("body", b"")
                size += len(chunk)
                if size > limit:
                    raise _TooLarge(limit)
                more = message.get("more_body", False)
                if body is None and not more:
                    return message
                if body is None:
                    body = tempfile.SpooledTemporaryFile(max_size=SPOOL_BYTES)  # noqa: SIM115 (the caller closes it)
                body.write(chunk)
                elapsed = time.monotonic() - started
                if more and elapsed > self.grace_seconds and size < self.min_rate * elapsed:
                    raise _TooSlow(
                        f"the request body came at {size / elapsed:.0f} bytes/s; at least "
                        f"{self.min_rate:.0f} are needed"
                    )
            return body
        except BaseException:
            if body is not None:
                body.close()
            raise
        finally:
            if self.reading is not None:
                self.reading.dec()
            self._sending[client] -= 1
            if not self._sending[client]:
                del self._sending[client]


class UrlGuard:
    """A NUL byte has no place in a URL (and PostgreSQL refuses it in text, so an id or a
    filter holding one would fail as a 500): 400, naming the part that holds it."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            where = _holding_nul(scope)
            if where:
                await _answer(BadRequest(f"{where} contains a NUL byte"), scope, receive, send)
                return
        await self.app(scope, receive, send)


def _holding_nul(scope: Scope) -> str | None:
    if "\x00" in scope["path"]:
        return "the URL's path"
    raw = scope.get("query_string", b"")
    if b"%00" not in raw and b"\x00" not in raw:  # the usual case: nothing to parse
        return None
    query = raw.decode("latin-1")
    for name, value in parse_qsl(query, keep_blank_values=True):
        if "\x00" in name or "\x00" in value:
            return f"query parameter '{name.replace(chr(0), '')}'"
    return None


def _once(message: Message, receive: Receive) -> Receive:
    """The body's one message; then whatever the client sends next (a disconnect)."""
    given = False

    async def replay() -> Message:
        nonlocal given
        if given:
            return await receive()
        given = True
        return message

    return replay


def _replay(body, receive: Receive) -> Receive:
    """The body from its file, in chunks; then whatever the client sends next (a disconnect)."""
    size = body.seek(0, 2)
    body.seek(0)
    finished = False

    async def replay() -> Message:
        nonlocal finished
        if finished:
            return await receive()
        chunk = body.read(REPLAY_CHUNK)
        finished = body.tell() >= size
        return {"type": "http.request", "body": chunk, "more_body": not finished}

    return replay


class _Refused(ApiError):
    def __init__(self, status: int, message: str, code: str, headers: dict | None = None):
        super().__init__(message, headers)
        self.status, self.code = status, code


class _TooLarge(_Refused):
    def __init__(self, limit: int):
        super().__init__(
            413, f"request body is larger than the limit of {limit} bytes", "payload_too_large"
        )


class _TooSlow(_Refused):
    def __init__(self, message: str):
        super().__init__(408, message, "request_timeout", {"Connection": "close"})


async def _answer(exc: ApiError, scope: Scope, receive: Receive, send: Send) -> None:
    response = error_response(scope, exc.status, exc.message, exc.headers, exc.param, exc.code)
    await response(scope, receive, send)
