"""Small helpers the tests share: images, NDJSON streams, usage lookups."""

import base64
import io
import json
from collections.abc import Iterator

import httpx
from PIL import Image
from sqlalchemy import select

from api.admission import slots_key
from billing.models import UsageRecord

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


def worker_statuses(redis_client) -> list:
    from workers.contract import WORKER_KEY_PREFIX, WorkerStatus

    keys = list(redis_client.scan_iter(match=WORKER_KEY_PREFIX + "*"))
    if not keys:
        return []
    return [WorkerStatus.model_validate_json(raw) for raw in redis_client.mget(keys) if raw]


def idle_status(redis_client, after: float, queue: str = "llava"):
    """The queue's single worker's status, published after `after` (unix time), once idle."""
    import time

    from tests.stack import wait_for

    def fresh():
        statuses = [s for s in worker_statuses(redis_client) if s.queue == queue]
        assert len(statuses) == 1, f"expected one {queue} worker, found {len(statuses)}"
        status = statuses[0]
        return status if status.updated_at > after and status.active == 0 else None

    return wait_for(fresh, 30, "an idle worker status", interval=0.1) or time.time()
