"""A corpus of hostile images and JSON: the gateway answers each with a clear error (or, for
unusual but valid images, with an answer), never a 5xx, and holds nothing afterwards."""

import base64
import io
import json
import re
import struct
import zlib

import httpx
import pytest
from PIL import Image

from harness.helpers import auth, chat_body, in_flight, png_bomb
from workers.keyspace import batches_index_key, jobs_index_key


def encoded(image: Image.Image, fmt: str, **save) -> str:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **save)
    return base64.b64encode(buffer.getvalue()).decode()


def sixteen_bit_png() -> str:
    return encoded(Image.new("I;16", (40, 30), 40000), "PNG")


def animated_gif() -> str:
    frames = [Image.new("P", (32, 32), i) for i in range(3)]
    return encoded(frames[0], "GIF", save_all=True, append_images=frames[1:], duration=50)


def wrong_magic() -> str:
    """A GIF's bytes under a PNG signature."""
    gif = base64.b64decode(encoded(Image.new("RGB", (8, 8)), "GIF"))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + gif[8:]).decode()


def huge_dimensions_header() -> str:
    """A PNG whose header claims 100000 x 100000 pixels and holds almost nothing."""
    header = struct.pack(">IIBBBBB", 100_000, 100_000, 8, 2, 0, 0, 0)
    ihdr = b"IHDR" + header
    chunk = struct.pack(">I", len(header)) + ihdr + struct.pack(">I", zlib.crc32(ihdr))
    return base64.b64encode(b"\x89PNG\r\n\x1a\n" + chunk).decode()


# name: (base64 image, whether it is a usable image)
IMAGES = {
    "cmyk jpeg": (lambda: encoded(Image.new("CMYK", (40, 30), (0, 128, 255, 0)), "JPEG"), True),
    "16-bit png": (sixteen_bit_png, True),
    "animated gif": (animated_gif, True),
    "rgba png": (lambda: encoded(Image.new("RGBA", (40, 30), (1, 2, 3, 0)), "PNG"), True),
    "1x1 png": (lambda: encoded(Image.new("RGB", (1, 1)), "PNG"), True),
    "wrong magic": (wrong_magic, False),
    "huge dimensions": (huge_dimensions_header, False),
    "bomb": (lambda: png_bomb(40_000), False),
    "empty": (lambda: "", False),
    "html": (lambda: base64.b64encode(b"<html><body>hi</body></html>").decode(), False),
    "base64 garbage": (lambda: "%%%not-base64%%%", False),
}


@pytest.mark.parametrize("name", list(IMAGES))
def test_hostile_images_to_chat(name, gateway, worker, tenant_factory, redis_client):
    tenant_id, key, _ = tenant_factory.create("pro")
    make, usable = IMAGES[name]
    response = httpx.post(
        f"{gateway.url}/api/chat",
        json=chat_body(images=[make()], num_predict=2) | {"stream": False},
        headers=auth(key),
        timeout=120,
    )
    if usable:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code in (400, 413), response.text
        assert "image" in response.json()["error"]
    assert in_flight(redis_client, tenant_id) == 0


@pytest.mark.parametrize("name", list(IMAGES))
def test_hostile_images_to_image_to_image(name, gateway, sd_worker, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    make, usable = IMAGES[name]
    body = {
        "prompt": "a lighthouse",
        "image": make(),
        "width": 64,
        "height": 64,
        "num_inference_steps": 2,
    }
    response = httpx.post(f"{gateway.url}/api/images", json=body, headers=auth(key), timeout=120)
    if usable:
        assert response.status_code == 200, response.text
    else:
        assert response.status_code in (400, 413), response.text
        assert "image" in response.json()["error"]


def deep(levels: int) -> bytes:
    return (
        b'{"model": "llava-llama3", "messages": [{"role": "user", "content": "hi"}], "x": '
        + (b"[" * levels + b"]" * levels)
        + b"}"
    )


JSON = {
    "NaN literal": b'{"model": "llava-llama3", "messages": [], "options": {"temperature": NaN}}',
    "Infinity": b'{"model": "llava-llama3", "messages": [{"role": "user", "content": "hi"}],'
    b' "options": {"temperature": Infinity}}',
    "number beyond double": b'{"model": "llava-llama3", "messages": [{"role": "user", '
    b'"content": "hi"}], "options": {"num_predict": 1e999}}',
    "huge integer": b'{"model": "llava-llama3", "messages": [{"role": "user", "content": "hi"}],'
    b' "options": {"seed": ' + b"9" * 5000 + b"}}",
    "deep nesting": deep(100_000),
    "enormous string": json.dumps(
        {"model": "llava-llama3", "messages": [{"role": "user", "content": "a" * 30_000_000}]}
    ).encode(),
    "lone surrogate": b'{"model": "llava-llama3", "messages": [{"role": "user", '
    b'"content": "\\ud800"}], "options": {"num_predict": 2}}',
    "not an object": b"[1, 2, 3]",
    "trailing garbage": b'{"model": "llava-llama3", "messages": []} {"again": 1}',
    "invalid utf-8": b'{"model": "llava-llama3", "messages": [{"role": "user", '
    b'"content": "\xff\xfe"}]}',
}


@pytest.mark.parametrize("path", ["/api/chat", "/v1/chat/completions"])
@pytest.mark.parametrize("name", list(JSON))
def test_hostile_json_gets_a_clear_error(name, path, gateway, worker, tenant_factory, redis_client):
    tenant_id, key, _ = tenant_factory.create("pro")
    response = httpx.post(
        f"{gateway.url}{path}",
        content=JSON[name],
        headers=auth(key) | {"Content-Type": "application/json"},
        timeout=120,
    )
    assert response.status_code < 500, (name, response.status_code, response.text[:300])
    if response.status_code >= 400:
        body = response.json()
        message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
        assert message.strip()
    assert in_flight(redis_client, tenant_id) == 0


def hostile_ids(tenant_id) -> dict[str, tuple[str, str, dict]]:
    """(method, path, headers) that name no job: other Redis keys, NUL bytes, positions past
    anything a stream holds."""
    index = f"by-tenant:{tenant_id}"  # the tenant's own job and batch indexes, other key types
    return {
        "job id naming an index": ("GET", f"/v1/jobs/{index}", {}),
        "cancel naming an index": ("POST", f"/v1/jobs/{index}/cancel", {}),
        "webhooks of an index": ("GET", f"/v1/jobs/{index}/webhooks", {}),
        "batch id naming an index": ("GET", f"/v1/batches/{index}", {}),
        "batch output of an index": ("GET", f"/v1/batches/{index}/output", {}),
        "NUL in a job id": ("GET", "/v1/jobs/ab%00cd", {}),
        "NUL in an adapter id": ("GET", "/v1/adapters/ab%00cd", {}),
        "NUL in an adapter's content": ("GET", "/v1/adapters/ab%00cd/content", {}),
        "NUL in an adapter to delete": ("DELETE", "/v1/adapters/ab%00cd", {}),
        "NUL in a fine-tuning job id": ("GET", "/v1/fine_tuning/jobs/ab%00cd", {}),
        "NUL in a fine-tuning job to cancel": ("POST", "/v1/fine_tuning/jobs/ab%00cd/cancel", {}),
        "NUL in a dashboard filter": ("GET", "/dashboard?model=llava%00", {}),
        "NUL in an audit filter": ("GET", "/admin/audit?target=a%00", {}),
        "NUL in a query parameter's name": ("GET", "/v1/jobs?a%00b=1", {}),
        "resume an index": ("GET", f"/api/jobs/{index}/stream", {}),
        "after past 64 bits": ("GET", "/api/jobs/abc/stream?after=" + "9" * 30, {}),
        "Last-Event-ID past 64 bits": ("GET", "/api/jobs/abc/stream", {"Last-Event-ID": "9" * 30}),
        # a superscript two, as a latin-1 header byte: a digit to str.isdigit, not to int()
        "Last-Event-ID of other digits": (
            "GET",
            "/api/jobs/abc/stream",
            {"Last-Event-ID": b"\xb2"},
        ),
    }


@pytest.mark.parametrize("name", list(hostile_ids("t")))
def test_hostile_ids_get_a_clear_error(name, gateway, tenant_factory, redis_client):
    tenant_id, key, _ = tenant_factory.create("pro")
    redis_client.zadd(jobs_index_key(str(tenant_id)), {"a-job": 1.0})
    redis_client.zadd(batches_index_key(str(tenant_id)), {"a-batch": 1.0})
    method, path, headers = hostile_ids(tenant_id)[name]
    response = httpx.request(method, f"{gateway.url}{path}", headers=auth(key) | headers)
    assert response.status_code in (400, 404), (name, response.status_code, response.text[:300])
    body = response.json()
    message = body["error"] if isinstance(body["error"], str) else body["error"]["message"]
    assert message.strip()


def test_a_nul_in_an_adapter_id_is_a_clear_error(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    response = httpx.post(
        f"{gateway.url}/api/images",
        json={"prompt": "a cat", "lora": "ab\u0000cd"},
        headers=auth(key),
    )
    assert response.status_code == 400, response.text
    assert "field 'lora'" in response.json()["error"]


@pytest.mark.parametrize("damage", ["bad crc", "encrypted", "unknown compression"])
def test_a_damaged_dataset_zip_is_a_clear_error(damage, gateway, tenant_factory):
    from tests.tuning.test_dataset import damaged
    from tests.tuning.test_fine_tuning import create

    _, key, _ = tenant_factory.create("pro")
    answer = create(gateway, key, damaged(damage))
    assert answer.status_code == 400, answer.text
    assert "a.txt" in answer.json()["error"]["message"]


def test_a_tenant_name_longer_than_its_column_is_a_clear_error_on_the_dashboard(gateway):
    from harness.helpers import dashboard_sign_in
    from tests.conftest import ADMIN_TOKEN

    with httpx.Client(base_url=gateway.url) as browser:
        assert dashboard_sign_in(browser, ADMIN_TOKEN).status_code == 303
        page = browser.get("/dashboard/admin").text
        csrf = re.search(r'name="csrf" value="([^"]+)"', page)[1]
        made = browser.post(
            "/dashboard/admin/tenants", data={"csrf": csrf, "name": "n" * 5000, "tier": "free"}
        )
    assert made.status_code == 400, made.text[:300]
    assert "5000 characters; at most 200" in made.text
