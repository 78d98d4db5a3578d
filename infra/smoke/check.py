"""What infra/smoke.sh asks of the compose stack, through the gateway's published port.

Standard library only: it runs with the host's python3, outside any image.

    check.py tenant URL          a Pro tenant and its key (ADMIN_TOKEN); prints the key
    check.py chat URL            one streamed /api/chat with an image (API_KEY); prints its id
    check.py image URL           one /api/images (API_KEY); prints its request id
    check.py metrics URL         /metrics counts them and their GPU-seconds

Each exits non-zero, saying what was wrong, when the answer is not what a tenant should get.
"""

import base64
import json
import os
import struct
import sys
import urllib.error
import urllib.request
import zlib

TIMEOUT = 300


def fail(message: str) -> None:
    print(f"smoke check failed: {message}", file=sys.stderr)
    sys.exit(1)


def request(url: str, token: str, body: dict | None = None):
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(url, data=data, method="POST" if data else "GET")
    req.add_header("Authorization", f"Bearer {token}")
    if data:
        req.add_header("Content-Type", "application/json")
    try:
        return urllib.request.urlopen(req, timeout=TIMEOUT)
    except urllib.error.HTTPError as exc:
        fail(f"{req.method} {url}: HTTP {exc.code}: {exc.read().decode(errors='replace')}")


def png(side: int = 32) -> bytes:
    """A small gradient picture, made without an imaging library."""
    rows = b"".join(
        b"\x00" + bytes(v for x in range(side) for v in (x * 8 % 256, y * 8 % 256, 128))
        for y in range(side)
    )

    def chunk(kind: bytes, payload: bytes) -> bytes:
        body = kind + payload
        return struct.pack(">I", len(payload)) + body + struct.pack(">I", zlib.crc32(body))

    header = struct.pack(">IIBBBBB", side, side, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(rows))
        + chunk(b"IEND", b"")
    )


def tenant(url: str) -> None:
    admin = os.environ["ADMIN_TOKEN"]
    created = json.load(request(f"{url}/admin/tenants", admin, {"name": "smoke", "tier": "pro"}))
    key = json.load(request(f"{url}/admin/tenants/{created['id']}/keys", admin, {}))
    print(key["key"])


def chat(url: str) -> None:
    body = {
        "model": "llava-llama3",
        "stream": True,
        "options": {"num_predict": 8, "seed": 7},
        "messages": [
            {
                "role": "user",
                "content": "What is in this picture?",
                "images": [base64.b64encode(png()).decode()],
            }
        ],
    }
    response = request(f"{url}/api/chat", os.environ["API_KEY"], body)
    chunks = [json.loads(line) for line in response if line.strip()]
    if not chunks:
        fail("the chat stream was empty")
    last = chunks[-1]
    if "error" in last or not last.get("done"):
        fail(f"the chat stream did not end with done: {last}")
    if not last.get("gpu_seconds", 0) > 0 or last.get("eval_count", 0) < 1:
        fail(f"the chat's final chunk has no gpu_seconds or tokens: {last}")
    if len(chunks) < 2:
        fail(f"the chat was not streamed: {chunks}")
    print(response.headers["X-Request-Id"])


def image(url: str) -> None:
    body = {"prompt": "a red fox", "num_inference_steps": 2, "seed": 3}
    response = request(f"{url}/api/images", os.environ["API_KEY"], body)
    answer = json.load(response)
    pictures = answer.get("images") or []
    if len(pictures) != 1 or not base64.b64decode(pictures[0]).startswith(b"\x89PNG"):
        fail(f"/api/images did not answer one PNG: {str(answer)[:300]}")
    if not answer.get("gpu_seconds", 0) > 0:
        fail(f"/api/images billed nothing: {str(answer)[:300]}")
    print(response.headers["X-Request-Id"])


def metrics(url: str) -> None:
    lines = urllib.request.urlopen(f"{url}/metrics", timeout=TIMEOUT).read().decode().splitlines()

    def total(prefix: str, *labels: str) -> float:
        return sum(
            float(line.rsplit(" ", 1)[1])
            for line in lines
            if line.startswith(prefix + "{") and all(label in line for label in labels)
        )

    for route in ("/api/chat", "/api/images"):
        if total("gpuhost_requests_total", f'route="{route}"', 'status="200"') < 1:
            fail(f"/metrics counts no answered {route} request")
    billed = total("gpuhost_billed_gpu_seconds_total")
    if not billed > 0:
        fail("/metrics shows no GPU-seconds billed")
    print(f"/metrics: chat and image requests answered, {billed:.3f} GPU-seconds billed")


if __name__ == "__main__":
    command, url, *rest = sys.argv[1:]
    {"tenant": tenant, "chat": chat, "image": image, "metrics": metrics}[command](url, *rest)
