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
