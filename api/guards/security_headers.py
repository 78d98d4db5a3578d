"""Headers every response carries, whatever route made it (a test reads them on every page).

All: no MIME sniffing, never framed, no Referer sent on. HTML (the dashboard): a Content
Security Policy that runs only the dashboard's own files (no inline script, no other origin),
and no caching (pages show usage and keys). Over HTTPS: Strict-Transport-Security.
"""

from starlette.types import ASGIApp, Message, Receive, Scope, Send

ALWAYS = [
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
PAGE = [
    (
        b"content-security-policy",
        b"default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        b"connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'self'; "
        b"frame-ancestors 'none'",
    ),
    (b"cache-control", b"no-store"),
]
HTTPS = [(b"strict-transport-security", b"max-age=31536000; includeSubDomains")]


class SecurityHeaders:
    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        secure = scope.get("scheme") == "https"

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers", []))
                present = {name.lower() for name, _ in headers}
                html = any(
                    name.lower() == b"content-type" and value.startswith(b"text/html")
                    for name, value in headers
                )
                extra = ALWAYS + (PAGE if html else []) + (HTTPS if secure else [])
                headers += [(name, value) for name, value in extra if name not in present]
                message = message | {"headers": headers}
            await send(message)

        await self.app(scope, receive, send_with_headers)
