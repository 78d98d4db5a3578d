"""What every API family's wire format shares: request ids, timestamps, durations, and the
limits on images attached to a chat, and a chat job's making. Each family's own shapes are in
its `schemas.py`."""

import time
import uuid
from datetime import UTC, datetime

from pydantic import BaseModel

from workers.contract import ChatJob, ChatTurn

NS = 1_000_000_000  # nanoseconds a second: Ollama's durations


def new_request_id() -> str:
    """A request's id: its usage record's, its job's, its `X-Request-Id`."""
    return uuid.uuid4().hex


def list_page(data: list[dict], has_more: bool = False) -> dict:
    """A list as every OpenAI-style route answers one: its page of objects (each with an
    `id`), the first and last ids (the next page starts `after` the last), and whether more
    follow."""
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": has_more,
    }


def timestamp() -> str:
    """Now, as RFC 3339 in UTC with a `Z`."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class ChatImageLimits(BaseModel):
    """Images attached to a chat request: how many, how large each may be, and the side the
    model sees (a larger image is reduced to it here: `image_checks.reduced`)."""

    max_count: int
    max_pixels: int
    side: int = 0

    @classmethod
    def of(cls, settings) -> "ChatImageLimits":
        return cls(
            max_count=settings.max_images_per_request,
            max_pixels=settings.max_image_pixels,
            side=settings.llava_image_side,
        )


def chat_job(
    owner, request_id: str, model: str, kind: str, turns: list[ChatTurn], options, **more
) -> ChatJob:
    """A chat job as every API family makes it: whose it is (`owner`, a KeyOwner), when it
    was asked for, what to run (`options`: SamplingOptions); `more`: the family's own fields."""
    return ChatJob(
        request_id=request_id,
        tenant_id=owner.tenant_id,
        api_key_id=owner.key_id,
        model=model,
        kind=kind,
        messages=turns,
        options=options,
        enqueued_at=time.time(),
        **more,
    )
