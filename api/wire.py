"""What every API family's wire format shares: request ids, timestamps, durations, and the
limits on images attached to a chat. Each family's own shapes are in its `schemas.py`."""

import uuid
from datetime import UTC, datetime

from pydantic import BaseModel

NS = 1_000_000_000  # nanoseconds a second: Ollama's durations


def new_request_id() -> str:
    """A request's id: its usage record's, its job's, its `X-Request-Id`."""
    return uuid.uuid4().hex


def timestamp() -> str:
    """Now, as RFC 3339 in UTC with a `Z`."""
    return datetime.now(UTC).isoformat().replace("+00:00", "Z")


class ChatImageLimits(BaseModel):
    """Images attached to a chat request: how many, and how large each may be."""

    max_count: int
    max_pixels: int

    @classmethod
    def of(cls, settings) -> "ChatImageLimits":
        return cls(max_count=settings.max_images_per_request, max_pixels=settings.max_image_pixels)
