"""Small helpers the tests share: images, NDJSON streams, usage lookups."""

import base64
import io
import json
import re
import time
import uuid
from collections.abc import Iterator

import httpx
from PIL import Image
from sqlalchemy import select

from billing.models import UsageRecord
from workers.contract import QUEUES
from workers.fleet_keys import FLEET_WAKE, fleet_waiting_keys
from workers.keyspace import SLOT_ACQUIRE, SLOT_RELEASE, slots_key

MODEL = "llava-llama3"


def png(width: int = 64, height: int = 48, color: str = "red") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (width, height), color).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def auth(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


def chat_body(
    content: str = "What is in this picture?", images: list[str] | None = None, **options
) -> dict:
    message = {"role": "user", "content": content}
    if images is not None:
        message["images"] = images
    return {"model": MODEL, "messages": [message], "options": {"seed": 7, **options}}


def ask(gateway, key: str, tokens: int = 3) -> httpx.Response:
    """A short chat on Ollama's /api/chat, its answer whole (not streamed)."""
    body = chat_body(num_predict=tokens) | {"stream": False}
    return httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=120)


def ndjson(response: httpx.Response) -> Iterator[dict]:
    for line in response.iter_lines():
        if line.strip():
            yield json.loads(line)


def usage_rows(sessions, request_id: str) -> list[UsageRecord]:
    with sessions() as session:
        return list(
            session.scalars(select(UsageRecord).where(UsageRecord.request_id == request_id))
        )


def in_flight(redis_client, tenant_id) -> int:
    """Live (unexpired) slots the tenant holds, read straight from Redis."""
    seconds, micros = redis_client.time()
    now_ms = seconds * 1000 + micros // 1000
    return redis_client.zcount(slots_key(tenant_id), f"({now_ms}", "+inf")


def hold_slot(redis_client, tenant_id, limit: int = 1) -> str:
    """Take one of the tenant's slots as a request would, so that the next one must wait."""
    holder = f"test-{uuid.uuid4().hex}"
    granted, *_ = redis_client.eval(SLOT_ACQUIRE, 1, slots_key(tenant_id), limit, 120_000, holder)
    assert granted == 1
    return holder


def free_slot(redis_client, tenant_id, holder: str) -> None:
    """Give the slot back as a request would (a job waiting for room is started now)."""
    keys = [slots_key(tenant_id), *fleet_waiting_keys(QUEUES)]
    redis_client.eval(SLOT_RELEASE, len(keys), *keys, holder, FLEET_WAKE)


def worker_statuses(redis_client) -> list:
    from workers.contract import WorkerStatus
    from workers.keyspace import WORKER_KEY_PREFIX

    keys = list(redis_client.scan_iter(match=WORKER_KEY_PREFIX + "*"))
    if not keys:
        return []
    return [WorkerStatus.model_validate_json(raw) for raw in redis_client.mget(keys) if raw]


def idle_status(redis_client, after: float, queue: str = "llava"):
    """The queue's single worker's status, published after `after` (unix time), once idle."""

    from harness.processes import wait_for

    def fresh():
        statuses = [s for s in worker_statuses(redis_client) if s.queue == queue]
        assert len(statuses) == 1, f"expected one {queue} worker, found {len(statuses)}"
        status = statuses[0]
        return status if status.updated_at > after and status.active == 0 else None

    return wait_for(fresh, 30, "an idle worker status", interval=0.1) or time.time()


def usage_create(
    tenant_id,
    gpu_seconds: float,
    request_id: str | None = None,
    finished_at=None,
    prompt_tokens: int = 1,
    output_tokens: int = 1,
):
    """A completed chat request's usage record (`billing.usage.UsageCreate`), not yet written."""
    import uuid
    from datetime import UTC, datetime

    from billing import usage

    return usage.UsageCreate(
        request_id=request_id or uuid.uuid4().hex,
        tenant_id=tenant_id,
        api_key_id=None,
        model=MODEL,
        kind="chat",
        status="completed",
        gpu_seconds=gpu_seconds,
        queue_seconds=0.0,
        prompt_tokens=prompt_tokens,
        output_tokens=output_tokens,
        started_at=None,
        finished_at=finished_at or datetime.now(UTC),
    )


def record_usage(session, tenant_id, gpu_seconds: float, *args, **fields) -> bool:
    """Write a completed chat usage record (and its outbox row) straight into the ledger;
    the rest as `usage_create` takes it."""
    from billing import usage

    return usage.record(session, usage_create(tenant_id, gpu_seconds, *args, **fields))


def png_bomb(side: int) -> str:
    """A PNG of a few hundred bytes that claims side x side pixels."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    header = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    raw = (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", header)
        + chunk(b"IDAT", zlib.compress(b"\x00" * 1000))
        + chunk(b"IEND", b"")
    )
    return base64.b64encode(raw).decode()


def dashboard_sign_in(client: httpx.Client, credential: str, **kwargs) -> httpx.Response:
    """Sign in as a browser does: the form first (its CSRF token and cookie), then the post.
    `client` has the gateway as its base URL and keeps cookies."""
    form = client.get("/dashboard/login", **kwargs)
    token = re.search(r'name="csrf" value="([^"]+)"', form.text).group(1)
    return client.post("/dashboard/login", data={"credential": credential, "csrf": token}, **kwargs)


def samples(url: str) -> dict[tuple, float]:
    """A Prometheus endpoint's samples: (name, sorted labels) -> value."""
    from prometheus_client.parser import text_string_to_metric_families

    found = {}
    for family in text_string_to_metric_families(httpx.get(url, timeout=10).text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)
