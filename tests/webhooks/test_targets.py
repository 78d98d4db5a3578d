"""Where webhooks and fetched image URLs may go, by default: public addresses only."""

import http.server
import threading

import httpx
import pytest

from webhooks.targets import FetchFailed, TargetRefused, fetch, networks, resolve


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://127.0.0.1:8080/hook", "127.0.0.1"),
        ("http://localhost/hook", "resolves to"),
        ("http://10.0.0.7/hook", "10.0.0.7"),
        ("http://192.168.1.1/hook", "192.168.1.1"),
        ("http://169.254.169.254/latest/meta-data", "169.254.169.254"),  # cloud metadata
        ("http://[::1]/hook", "::1"),
        ("http://[::ffff:127.0.0.1]/hook", "::ffff:127.0.0.1"),
        # IPv6 forms that carry an internal IPv4 address
        ("http://[::127.0.0.1]/hook", "::127.0.0.1"),  # IPv4-compatible
        ("http://[::ffff:0:127.0.0.1]/hook", "::ffff:0:7f00:1"),  # IPv4-translated (SIIT)
        ("http://[::ffff:0:a9fe:a9fe]/hook", "::ffff:0:a9fe:a9fe"),  # translated metadata
        ("http://[64:ff9b::127.0.0.1]/hook", "64:ff9b::7f00:1"),  # NAT64
        ("http://[64:ff9b::a9fe:a9fe]/hook", "64:ff9b::a9fe:a9fe"),  # NAT64 of the metadata
        ("http://[64:ff9b:1::808:808]/hook", "64:ff9b:1::808:808"),  # local-use NAT64
        ("http://[2002:7f00:1::]/hook", "2002:7f00:1::"),  # 6to4 of 127.0.0.1
        ("http://[2002:a00:1::1]/hook", "2002:a00:1::1"),  # 6to4 of 10.0.0.1
        ("http://[2001:0:4136:e378:8000:63bf:80ff:fffe]/hook", "2001:0:4136"),  # Teredo
        ("http://[fe80::1%25eth0]/hook", "fe80::1"),  # link-local with a scope
        ("http://0.0.0.0/hook", "0.0.0.0"),
        ("http://100.64.0.1/hook", "100.64.0.1"),  # carrier-grade NAT
        ("http://224.0.0.1/hook", "224.0.0.1"),
        ("ftp://example.com/hook", "http:// or https://"),
        ("https://user:pw@example.com/hook", "credentials"),
        ("http:///hook", "no host"),
        ("http://example.com/a\x00b", "control characters"),
        ("http://example.com/a b", "spaces"),
        ("http://example.com:99999/hook", "not a URL"),
        ("http://no-such-host.invalid/hook", "does not resolve"),
    ],
)
def test_refused_by_default(url, why):
    with pytest.raises(TargetRefused, match=why.replace("[", r"\[").replace(".", r"\.")):
        resolve(url, [])


def test_a_public_address_is_allowed_and_pinned():
    target = resolve("https://93.184.215.14:8443/a/b?x=1", [])
    assert target.address == "93.184.215.14"
    assert target.pinned_url() == "https://93.184.215.14:8443/a/b?x=1"


def test_the_operator_may_allow_a_network():
    target = resolve("http://127.0.0.1:9000/hook", networks(["127.0.0.0/8"]))
    assert target.pinned_url() == "http://127.0.0.1:9000/hook"
    with pytest.raises(TargetRefused):
        resolve("http://10.0.0.1/hook", networks(["127.0.0.0/8"]))


def test_ipv6_forms_of_public_addresses_are_allowed():
    for address in ("2606:4700:4700::1111", "64:ff9b::808:808", "2002:808:808::1"):
        assert resolve(f"https://[{address}]/hook", []).address == address


class _Server(http.server.BaseHTTPRequestHandler):
    def do_GET(self):  # noqa: N802 (the standard library's name)
        if self.path == "/moved":
            self.send_response(302)
            self.send_header("Location", "http://127.0.0.1:1/secret")
            self.end_headers()
            return
        body = b"x" * 100
        self.send_response(200 if self.path == "/image" else 404)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def local_server():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Server)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


async def test_fetch_refuses_an_internal_address_before_connecting(local_server):
    async with httpx.AsyncClient(timeout=5) as client:
        with pytest.raises(TargetRefused, match="may not reach"):
            await fetch(client, f"{local_server}/image", [], 1000, "image URL")


async def test_fetch_follows_no_redirect_and_says_little(local_server):
    allowed = networks(["127.0.0.0/8"])
    async with httpx.AsyncClient(timeout=5) as client:
        assert await fetch(client, f"{local_server}/image", allowed, 1000, "image URL") == (
            b"x" * 100
        )
        with pytest.raises(FetchFailed, match="redirects are not followed"):
            await fetch(client, f"{local_server}/moved", allowed, 1000, "image URL")
        with pytest.raises(FetchFailed, match="answered HTTP 404"):
            await fetch(client, f"{local_server}/missing", allowed, 1000, "image URL")
        with pytest.raises(FetchFailed, match="larger than 10 bytes"):
            await fetch(client, f"{local_server}/image", allowed, 10, "image URL")
        # a closed port and a refused connection read the same as any other failure
        with pytest.raises(FetchFailed, match="^image URL: could not be fetched$"):
            await fetch(client, "http://127.0.0.1:1/x", allowed, 1000, "image URL")
