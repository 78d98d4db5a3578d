"""ASGI middleware that refuses request bodies over a size limit with 413."""

import json

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from api.errors import error_body, error_body_openai


class BodyLimit:
    def __init__(self, app: ASGIApp, max_bytes: int, uploads: dict[str, int] | None = None):
        self.app = app
        self.max_bytes = max_bytes
        self.uploads = uploads or {}  # path: its own (larger) limit, e.g. dataset uploads

    async def _refuse(self, scope: Scope, send: Send, limit: int) -> None:
        message = f"request body is larger than the limit of {limit} bytes"
        if scope["path"].startswith("/v1/"):
            shaped = error_body_openai(413, message, code="payload_too_large")
        else:
            shaped = error_body(message)
        body = json.dumps(shaped).encode()
        await send(
            {
                "type": "http.response.start",
                "status": 413,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        limit = self.uploads.get(scope["path"], self.max_bytes)
        for name, value in scope["headers"]:
            if name == b"content-length" and value.isdigit() and int(value) > limit:
                await self._refuse(scope, send, limit)
                return
        # Read the body up to the limit (it is read whole by the app anyway), then replay it.
        chunks, size, more = [], 0, True
        while more:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            size += len(chunk)
            if size > limit:
                await self._refuse(scope, send, limit)
                return
            chunks.append(chunk)
            more = message.get("more_body", False)
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)
