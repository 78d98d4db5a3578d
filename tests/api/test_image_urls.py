"""OpenAI-style image_url parts with http(s) URLs (GPUHOST_FETCH_IMAGE_URLS on): counted and
checked first, fetched only once the request is admitted (within its tenant's tier), and at
most a request's largest body fetched in all. The images come from a server of the test's own
on loopback, which counts what it was asked for."""

import base64
import http.server
import threading

import httpx
import pytest

from harness.helpers import MODEL, auth, free_slot, hold_slot, in_flight, png
from tests.conftest import running_gateway

PICTURE = base64.b64decode(png(64, 48, "blue"))
LARGE = 300_000  # bytes of the /large file: 4 of them are over the test gateway's 1 MB


class Pictures(http.server.BaseHTTPRequestHandler):
    asked: list[str] = []
    sent = [0]

    def do_GET(self):  # noqa: N802 (the standard library's name)
        body = b"\0" * LARGE if self.path.startswith("/large") else PICTURE
        Pictures.asked.append(self.path)
        self.send_response(200)
        self.send_header("Content-Type", "image/png")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
        Pictures.sent[0] += len(body)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def pictures():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Pictures)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


@pytest.fixture
def served():
    """What the picture server was asked for during the test, and how many bytes it sent."""
    Pictures.asked.clear()
    Pictures.sent[0] = 0
    return Pictures


@pytest.fixture(scope="module")
def fetching_gateway(stack_env, tmp_path_factory):
    env = stack_env | {
        "GPUHOST_FETCH_IMAGE_URLS": "true",
        "GPUHOST_IMAGE_URL_ALLOWED_NETWORKS": "127.0.0.0/8",
        "GPUHOST_MAX_BODY_BYTES": "1000000",
    }
    yield from running_gateway("gateway-fetching-images", env, tmp_path_factory)


def ask(gateway, key: str, urls: list[str]) -> httpx.Response:
    parts = [{"type": "text", "text": "What are these?"}]
    parts += [{"type": "image_url", "image_url": {"url": url}} for url in urls]
    body = {"model": MODEL, "max_tokens": 2, "messages": [{"role": "user", "content": parts}]}
    return httpx.post(
        f"{gateway.url}/v1/chat/completions", json=body, headers=auth(key), timeout=60
    )


def test_too_many_images_are_refused_before_one_is_fetched(
    fetching_gateway, pictures, served, tenant_factory
):
    _, key, _ = tenant_factory.create("max")
    answer = ask(fetching_gateway, key, [f"{pictures}/{i}.png" for i in range(100)])
    assert answer.status_code == 400, answer.text
    assert "100 images; at most 8" in answer.json()["error"]["message"]
    assert served.asked == []


def test_images_are_fetched_only_once_the_request_is_admitted(
    fetching_gateway, pictures, served, tenant_factory, redis_client
):
    tenant_id, key, _ = tenant_factory.create("free")
    holder = hold_slot(redis_client, tenant_id)  # its one request in flight
    try:
        answer = ask(fetching_gateway, key, [f"{pictures}/cat.png"])
    finally:
        free_slot(redis_client, tenant_id, holder)
    assert answer.status_code == 429, answer.text
    assert served.asked == []


@pytest.mark.usefixtures("worker")
def test_an_admitted_request_fetches_its_images_and_is_answered(
    fetching_gateway, pictures, served, tenant_factory
):
    _, key, _ = tenant_factory.create("pro")
    answer = ask(fetching_gateway, key, [f"{pictures}/cat.png", f"{pictures}/dog.png"])
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["prompt_tokens"] > 2 * 576  # both pictures went along
    assert sorted(served.asked) == ["/cat.png", "/dog.png"]


def test_no_more_than_a_bodys_bytes_are_fetched_in_all(
    fetching_gateway, pictures, served, tenant_factory, redis_client
):
    tenant_id, key, _ = tenant_factory.create("pro")
    answer = ask(fetching_gateway, key, [f"{pictures}/large{i}.png" for i in range(8)])
    assert answer.status_code == 400, answer.text
    assert "larger than" in answer.json()["error"]["message"]
    assert len(served.asked) == 4  # the fourth went past the 1 MB a request may carry
    assert served.sent[0] <= 4 * LARGE
    assert in_flight(redis_client, tenant_id) == 0  # its slot is free again
