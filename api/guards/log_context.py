"""Each answer's request id, said to the logs before its line is written: the access line
uvicorn writes when the answer starts carries the `request_id` of its `X-Request-Id` (and the
tenant the request's key belongs to, bound when it was checked: `api/deps.py`). A traced
request's answer carries its trace id, `X-Trace-Id` (config/traces.py)."""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from config import logs, traces


class LogContext:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)

        async def sending(message: Message) -> None:
            if message["type"] == "http.response.start":
                for name, value in message.get("headers", ()):
                    if name.lower() == b"x-request-id":
                        logs.bind(request_id=value.decode("latin-1"))
                if (traced := traces.trace_id()) is not None:
                    headers = [*message.get("headers", ()), (b"x-trace-id", traced.encode())]
                    message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, sending)
