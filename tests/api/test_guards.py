"""What one hostile request must not do to everyone else: stall the gateway with heavy images,
make it hold a body for a stranger, or keep a connection with a body that never finishes."""

import base64
import io
import json
import re
import secrets
import socket
import threading
import time
from collections.abc import Iterator

import httpx
import pytest
from PIL import Image

from harness.helpers import auth, dashboard_sign_in, png_bomb, samples, value
from harness.processes import Gateway, free_port, wait_for
from tests.api.test_batches import ended, output
from tests.conftest import ADMIN_TOKEN, running_gateway
from workers.keyspace import credential_failures_key

LINES = 24  # of an image each: about 4 s of checking on this machine


@pytest.fixture(scope="module")
def heavy_png() -> str:
    """An image at the pixel limit (4096 x 4096) that compresses to almost nothing: 87 KB of
    PNG, a quarter of a second of decoding."""
    buffer = io.BytesIO()
    Image.new("RGB", (4096, 4096)).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


@pytest.fixture(scope="module")
def strict_gateway(stack_env, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway that gives up on a body after a one-second pause, lets one address send two
    bodies at once, waits two seconds for a request head and lets one address hold six
    connections."""
    env = stack_env | {
        "GPUHOST_BODY_IDLE_SECONDS": "1",
        "GPUHOST_BODIES_PER_CLIENT": "2",
        "GPUHOST_HEAD_TIMEOUT_SECONDS": "2",
        "GPUHOST_CONNECTIONS_PER_CLIENT": "6",
    }
    yield from running_gateway("strict-gateway", env, tmp_path_factory)


def reading(gateway: Gateway) -> float:
    """Request bodies the gateway is receiving now (its metrics, read on their own
    connection)."""
    return value(samples(f"{gateway.url}/metrics"), "gpuhost_request_bodies_reading")


def open_connections(gateway: Gateway) -> float:
    """Connections open to the gateway, less the one that asks (infinite while the address
    may open no more)."""
    try:
        return value(samples(f"{gateway.url}/metrics"), "gpuhost_connections_open") - 1
    except httpx.HTTPError:
        return float("inf")


def raw_request(gateway: Gateway, head: str, body: bytes = b"") -> socket.socket:
    """A connection that has sent `head` (request line and headers) and `body`, no more."""
    connection = socket.create_connection(("127.0.0.1", gateway.port), timeout=10)
    connection.sendall(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    return connection


def status_of(connection: socket.socket) -> tuple[int, str]:
    """The status and the rest of the response (headers and body) on `connection`."""
    answer = b""
    while b"\r\n\r\n" not in answer and (piece := connection.recv(65536)):
        answer += piece
    head, _, body = answer.partition(b"\r\n\r\n")
    length = next(
        (
            int(line.split(b":")[1])
            for line in head.lower().split(b"\r\n")
            if line.startswith(b"content-length:")
        ),
        0,
    )
    while len(body) < length and (piece := connection.recv(65536)):
        body += piece
    connection.close()
    line, _, rest = (head + b"\r\n\r\n" + body).decode("latin-1").partition("\r\n")
    return int(line.split()[1]), rest


def test_heavy_images_do_not_stall_the_gateway(gateway, tenant_factory, heavy_png):
    """A Free key's batch of images at the pixel limit takes seconds to check; meanwhile the
    gateway answers everyone else (the images are decoded off its event loop)."""
    _, key, _ = tenant_factory.create("free")
    lines = [
        {"custom_id": f"line-{i}", "type": "images", "input": {"prompt": "x", "image": heavy_png}}
        for i in range(LINES)
    ]
    text = "\n".join(json.dumps(line) for line in lines)
    answered = {}

    def upload():
        answered["batch"] = httpx.post(
            f"{gateway.url}/v1/batches",
            files={"file": ("requests.jsonl", text.encode(), "application/jsonl")},
            headers=auth(key),
            timeout=120,
        )
        answered["batch at"] = time.monotonic()

    sending = threading.Thread(target=upload)
    started = time.monotonic()
    sending.start()
    wait_for(  # the upload is in, its images are being checked
        lambda: value(samples(f"{gateway.url}/metrics"), "gpuhost_image_checks_running") > 0,
        60,
        "the batch's images to be checked",
        interval=0.01,
    )
    asked = time.monotonic()
    assert httpx.get(f"{gateway.url}/healthz", timeout=60).status_code == 200
    health_took = time.monotonic() - asked
    sending.join()
    batch_took = answered["batch at"] - started
    # On the event loop, the health check waited for the rest of the checks (3/4 of them).
    assert health_took < batch_took / 4, f"/healthz took {health_took:.2f} s of {batch_took:.2f}"
    # every line's image was checked: each line ends with its own error (the width the image
    # implies is over the limit), none is lost
    batch = answered["batch"]
    assert batch.status_code == 201, batch.text
    assert ended(gateway, key, batch.json()["id"])["request_counts"]["failed"] == LINES
    results = output(gateway, key, batch.json()["id"])
    assert sorted(r["custom_id"] for r in results) == sorted(f"line-{i}" for i in range(LINES))
    assert all("'width': 4096 is over the limit" in r["error"]["message"] for r in results)


def test_an_unknown_key_is_refused_before_its_body_is_read(gateway):
    """A stranger announcing a 200 MB upload gets its 401 without sending a byte of it."""
    connection = raw_request(
        gateway,
        "POST /v1/batches HTTP/1.1\nHost: x\nAuthorization: Bearer gph_not-a-key\n"
        "Content-Type: multipart/form-data; boundary=b\nContent-Length: 200000000\n",
    )
    status, rest = status_of(connection)
    assert status == 401, rest


def test_without_a_key_a_body_is_small(gateway):
    """No credential: at most the anonymous limit (1 MB), refused from its declared length."""
    connection = raw_request(
        gateway,
        "POST /v1/batches HTTP/1.1\nHost: x\nContent-Type: application/json\n"
        "Content-Length: 200000000\n",
    )
    status, rest = status_of(connection)
    assert status == 413, rest
    assert "1048576 bytes" in rest


def test_a_body_that_stops_coming_is_dropped(strict_gateway, tenant_factory):
    _, key, _ = tenant_factory.create("free")
    connection = raw_request(
        strict_gateway,
        f"POST /api/chat HTTP/1.1\nHost: x\nAuthorization: Bearer {key}\n"
        "Content-Type: application/json\nContent-Length: 1000\n",
        b'{"model": "llava',
    )
    status, rest = status_of(connection)  # after the one-second pause
    assert status == 408, rest
    assert "no part of the request body came for 1 s" in rest


def test_one_address_sends_only_so_many_bodies_at_once(strict_gateway, tenant_factory):
    _, key, _ = tenant_factory.create("free")
    head = (
        f"POST /api/chat HTTP/1.1\nHost: x\nAuthorization: Bearer {key}\n"
        "Content-Type: application/json\nContent-Length: 1000\n"
    )
    stalled = [raw_request(strict_gateway, head, b"{") for _ in range(2)]
    wait_for(lambda: reading(strict_gateway) == 2, 10, "both bodies to be read", interval=0.01)
    status, rest = status_of(raw_request(strict_gateway, head, b"{"))
    assert status == 429, rest
    assert "already sending 2 request bodies" in rest
    for connection in stalled:
        assert status_of(connection)[0] == 408  # and they end, freeing the address
    assert httpx.get(f"{strict_gateway.url}/healthz").status_code == 200


def closed_within(connection: socket.socket, seconds: float) -> bool:
    """Whether the server closes `connection` within `seconds` (reading whatever it sends)."""
    connection.settimeout(seconds)
    try:
        while connection.recv(65536):
            pass
        return True
    except TimeoutError:
        return False
    finally:
        connection.close()


def test_a_request_head_that_never_finishes_is_closed(strict_gateway):
    silent = socket.create_connection(("127.0.0.1", strict_gateway.port))
    trickling = socket.create_connection(("127.0.0.1", strict_gateway.port))
    trickling.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\nX-Slow: ")
    kept_alive = socket.create_connection(("127.0.0.1", strict_gateway.port))
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
    assert kept_alive.recv(65536).startswith(b"HTTP/1.1 200")
    kept_alive.sendall(b"GET /healthz HTTP/1.1\r\nHo")  # its next head, never finished
    for connection in (silent, trickling, kept_alive):
        assert closed_within(connection, 10)


def test_one_address_holds_only_so_many_connections(strict_gateway):
    before = open_connections(strict_gateway)
    held = [socket.create_connection(("127.0.0.1", strict_gateway.port)) for _ in range(6)]
    # connections are accepted in the order they came: the six before this one
    extra = socket.create_connection(("127.0.0.1", strict_gateway.port))
    assert closed_within(extra, 1)  # closed at once, long before the head timeout
    for connection in held:
        connection.close()
    wait_for(
        lambda: open_connections(strict_gateway) <= before,
        10,
        "the held connections to be closed",
        interval=0.01,
    )
    assert httpx.get(f"{strict_gateway.url}/healthz").status_code == 200


def test_an_edit_mask_over_the_bomb_limit_is_a_clear_error(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    picture = io.BytesIO()
    Image.new("RGB", (64, 64)).save(picture, "PNG")
    answer = httpx.post(
        f"{gateway.url}/v1/images/edits",
        headers=auth(key),
        data={"prompt": "a cat"},
        files={
            "image": ("image.png", picture.getvalue(), "image/png"),
            "mask": ("mask.png", base64.b64decode(png_bomb(20_000)), "image/png"),
        },
        timeout=30,
    )
    assert answer.status_code == 413, answer.text
    error = answer.json()["error"]
    assert error["param"] == "mask" and "mask" in error["message"], error


@pytest.fixture(scope="module")
def fronted_gateway(stack_env, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway behind a (pretend) proxy on 127.0.0.1, with three failed credentials allowed
    per window, its metrics on a port of their own and a public URL of its own."""
    metrics_port = free_port()
    env = stack_env | {
        "GPUHOST_CREDENTIAL_FAILURES_LIMIT": "3",
        "GPUHOST_TRUSTED_PROXIES": '["127.0.0.0/8"]',
        "GPUHOST_METRICS_PORT": str(metrics_port),
        "GPUHOST_PUBLIC_BASE_URL": "https://gpu.example.com",
    }
    for gateway in running_gateway("fronted-gateway", env, tmp_path_factory):
        gateway.metrics_port = metrics_port
        yield gateway


def from_address(address: str, key: str | None = None) -> dict:
    headers = {"X-Forwarded-For": address}
    return headers | (auth(key) if key else {})


def bad_key(prefix: str = "gph_") -> str:
    return prefix + secrets.token_hex(14)


def test_failed_keys_are_throttled_by_address(fronted_gateway, tenant_factory, redis_client):
    _, good, _ = tenant_factory.create("free")
    url = f"{fronted_gateway.url}/api/tags"
    for _ in range(3):
        answer = httpx.get(url, headers=from_address("203.0.113.7", bad_key()))
        assert answer.status_code == 401, answer.text
    throttled = httpx.get(url, headers=from_address("203.0.113.7", bad_key()))
    assert throttled.status_code == 429, throttled.text
    assert "too many failed credentials from this address" in throttled.json()["error"]
    assert 1 <= int(throttled.headers["Retry-After"]) <= 60
    # the counter ends with its window, on every Redis the service runs on (6.2 included)
    assert 0 < redis_client.ttl(credential_failures_key("203.0.113.7")) <= 60
    # a valid key is never refused, even from the address that failed
    assert httpx.get(url, headers=from_address("203.0.113.7", good)).status_code == 200
    assert httpx.get(url, headers=from_address("203.0.113.8", good)).status_code == 200
    # and a POST's bad key is answered before its body
    posted = httpx.post(
        f"{fronted_gateway.url}/api/chat",
        headers=from_address("203.0.113.7", bad_key()),
        json={"model": "llava-llama3", "messages": []},
    )
    assert posted.status_code == 429, posted.text


def test_others_failures_never_refuse_a_valid_key(fronted_gateway, tenant_factory):
    """20 guesses sharing a victim's visible prefix, from 20 addresses, then the victim's own
    key from each of them and from another: it works everywhere (no lockout to hand out)."""
    _, victim, _ = tenant_factory.create("pro")
    url = f"{fronted_gateway.url}/api/tags"
    guessers = [f"198.51.100.{i}" for i in range(20)]
    for address in guessers:
        guess = victim[:8] + secrets.token_hex(13)
        answer = httpx.get(url, headers=from_address(address, guess))
        assert answer.status_code == 401, answer.text
    for address in [*guessers, "198.51.100.200"]:
        answer = httpx.get(url, headers=from_address(address, victim))
        assert answer.status_code == 200, (address, answer.text)


def test_failed_admin_tokens_and_sign_ins_are_throttled(fronted_gateway):
    admin = f"{fronted_gateway.url}/admin/tenants"
    for _ in range(3):
        wrong = {"Authorization": f"Bearer {secrets.token_hex(20)}"}
        assert httpx.get(admin, headers=from_address("192.0.2.10") | wrong).status_code == 401
    wrong = {"Authorization": f"Bearer {secrets.token_hex(20)}"}
    assert httpx.get(admin, headers=from_address("192.0.2.10") | wrong).status_code == 429
    # the operator's own token still works from there
    token = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(admin, headers=from_address("192.0.2.10") | token).status_code == 200
    with httpx.Client(base_url=fronted_gateway.url, headers=from_address("192.0.2.11")) as client:
        for _ in range(3):
            assert dashboard_sign_in(client, "x").status_code == 401
        page = dashboard_sign_in(client, "x")
        assert page.status_code == 429 and "too many failed credentials" in page.text
        assert dashboard_sign_in(client, ADMIN_TOKEN).status_code == 303


def test_metrics_have_a_port_of_their_own(fronted_gateway):
    assert httpx.get(f"{fronted_gateway.url}/metrics").status_code == 404
    metrics = f"http://127.0.0.1:{fronted_gateway.metrics_port}"
    scraped = httpx.get(f"{metrics}/metrics")
    assert scraped.status_code == 200 and "gpuhost_requests_total" in scraped.text
    assert httpx.get(f"{metrics}/healthz").status_code == 404
    assert httpx.get(f"{fronted_gateway.url}/healthz").status_code == 200


def test_image_links_start_with_the_public_url(fronted_gateway, sd_worker, tenant_factory):
    _, key, _ = tenant_factory.create("free")
    answer = httpx.post(
        f"{fronted_gateway.url}/v1/images/generations",
        headers=auth(key),
        json={"prompt": "a lighthouse", "size": "64x64", "response_format": "url"},
        timeout=120,
    )
    assert answer.status_code == 200, answer.text
    link = answer.json()["data"][0]["url"]
    assert link.startswith("https://gpu.example.com/v1/images/files/"), link
    local = link.replace("https://gpu.example.com", fronted_gateway.url)
    assert httpx.get(local, headers=auth(key)).headers["content-type"] == "image/png"


def test_sign_in_needs_the_form_it_was_given(gateway):
    """Another site's form cannot sign a browser in (login CSRF): no token, no session."""
    forged = httpx.post(f"{gateway.url}/dashboard/login", data={"credential": ADMIN_TOKEN})
    assert forged.status_code == 403 and "has expired" in forged.text
    assert "gpuhost_session" not in forged.headers.get("set-cookie", "")
    with httpx.Client(base_url=gateway.url) as client:
        client.get("/dashboard/login")
        wrong = client.post(
            "/dashboard/login", data={"credential": ADMIN_TOKEN, "csrf": "not-the-token"}
        )
        assert wrong.status_code == 403
        assert dashboard_sign_in(client, ADMIN_TOKEN).status_code == 303


def test_every_page_and_answer_carries_the_security_headers(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    with httpx.Client(base_url=gateway.url) as tenant, httpx.Client(base_url=gateway.url) as op:
        assert dashboard_sign_in(tenant, key).status_code == 303
        assert dashboard_sign_in(op, ADMIN_TOKEN).status_code == 303
        answers = [
            tenant.get("/dashboard/login"),
            tenant.get("/dashboard/usage"),
            tenant.get("/dashboard/keys"),
            op.get("/dashboard/admin"),
            tenant.get("/dashboard/no-such-page"),
            tenant.get("/dashboard/static/dashboard.js"),
            httpx.get(f"{gateway.url}/api/tags", headers=auth(key)),
            httpx.get(f"{gateway.url}/v1/models"),  # a 401
        ]
    for answer in answers:
        where = f"{answer.request.url.path} ({answer.status_code})"
        assert answer.headers["x-content-type-options"] == "nosniff", where
        assert answer.headers["x-frame-options"] == "DENY", where
        assert answer.headers["referrer-policy"] == "no-referrer", where
        if answer.headers["content-type"].startswith("text/html"):
            policy = answer.headers["content-security-policy"]
            assert "script-src 'self'" in policy and "frame-ancestors 'none'" in policy, where
            assert answer.headers["cache-control"] == "no-store", where


def test_a_tenants_own_key_changes_are_audited_and_take_effect_at_once(gateway, tenant_factory):
    """Keys made and revoked on the dashboard go through the same audited billing functions as
    the operator's; the revoked key stops at once on this gateway, the others keep working."""
    tenant_id, key, key_id = tenant_factory.create("pro")
    with httpx.Client(base_url=gateway.url) as browser:
        assert dashboard_sign_in(browser, key).status_code == 303
        csrf = re.search(r'name="csrf" value="([^"]+)"', browser.get("/dashboard/keys").text)[1]
        made = browser.post("/dashboard/keys", data={"csrf": csrf, "scope": ["inference"]})
        assert made.status_code == 201
        other = re.search(r"(gph_[0-9A-Za-z]{30})", made.text)[1]
        assert httpx.get(f"{gateway.url}/api/tags", headers=auth(other)).status_code == 200
        [new_id] = [
            k["id"]
            for k in httpx.get(
                f"{gateway.url}/admin/tenants/{tenant_id}/keys",
                headers=auth(ADMIN_TOKEN),
            ).json()["keys"]
            if k["id"] != str(key_id)
        ]
        revoked = browser.post(f"/dashboard/keys/{new_id}/revoke", data={"csrf": csrf})
        assert revoked.status_code == 303
    assert httpx.get(f"{gateway.url}/api/tags", headers=auth(other)).status_code == 401
    assert httpx.get(f"{gateway.url}/api/tags", headers=auth(key)).status_code == 200
    audit = httpx.get(
        f"{gateway.url}/admin/audit", params={"target": new_id}, headers=auth(ADMIN_TOKEN)
    ).json()["entries"]
    assert {(e["action"], e["actor"]) for e in audit} == {
        ("key.create", "dashboard (tenant)"),
        ("key.revoke", "dashboard (tenant)"),
    }
