"""Checking images a client sent, before anything is queued or held."""

import base64
import binascii
import io
import warnings
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import TypeVar

import anyio
import anyio.to_thread
from PIL import Image, UnidentifiedImageError
from prometheus_client import Gauge

from api.errors import BadRequest, PayloadTooLarge

DATA_URL_MARK = ";base64,"
T = TypeVar("T")


class Decoder:
    """Runs the checks of a request's images in threads, off the event loop.

    A request may carry dozens of images of up to max_image_pixels each, and decoding them
    takes seconds; on the event loop that would stall every other request of the gateway
    (health checks included). Here at most `threads` checks run at once in the gateway, and one
    tenant's requests hold at most its tier's concurrency of them, so a tenant with heavy
    images waits for its own, never takes every thread, and never stalls anyone else.
    """

    def __init__(self, threads: int, tier_limits: dict[str, int], running: Gauge | None = None):
        self._threads = anyio.CapacityLimiter(threads)
        self._tier_limits = tier_limits
        self._tenants: dict[str, tuple[anyio.CapacityLimiter, int]] = {}  # limiter, users
        self._running = running  # counts the checks running now

    async def run(self, owner, images: bool, check: Callable[..., T], *args) -> T:
        """`check(*args)` (which decodes images when `images`), off the loop if it has any."""
        if not images:
            return check(*args)
        async with self.turn(owner):
            return await self.in_thread(check, *args)

    async def in_thread(self, check: Callable[..., T], *args) -> T:
        """`check(*args)` in one of the gateway's checking threads (inside a `turn`)."""
        async with self._threads:
            if self._running is not None:
                self._running.inc()
            try:
                return await anyio.to_thread.run_sync(check, *args)
            finally:
                if self._running is not None:
                    self._running.dec()

    @asynccontextmanager
    async def turn(self, owner) -> AsyncIterator[None]:
        """One of the tenant's turns at checking: at most its tier's concurrency at once."""
        tenant = str(owner.tenant_id)
        limiter, users = self._tenants.get(tenant) or (
            anyio.CapacityLimiter(max(1, self._tier_limits.get(owner.tier, 1))),
            0,
        )
        self._tenants[tenant] = (limiter, users + 1)
        try:
            async with limiter:
                yield
        finally:
            limiter, users = self._tenants[tenant]
            if users == 1:
                del self._tenants[tenant]
            else:
                self._tenants[tenant] = (limiter, users - 1)


def check_image(data: str, field: str, max_pixels: int, side: int = 0) -> str:
    """Validate one base64 image; return its base64 (a data: URL prefix is removed), reduced
    to `side` when it is larger (`reduced`; 0: as it came)."""
    if not side:
        return check_image_sized(data, field, max_pixels)[0]
    raw = _base64(data, field)
    return reduced(decoded(raw, field, max_pixels), side) or _unprefixed(data)


def reduced(image: Image.Image, side: int) -> str | None:
    """The image as the chat model's processor would first make it, when its shorter side is
    over `side` (LLaVA's CLIP takes 336 x 336: RGB, the shorter side resized to it with
    bicubic, as its processor does, which then leaves it as it is): PNG, base64. None if it
    is no larger. What the model sees is the same; what a job carries to its worker, through
    Redis and the broker, is a fraction, and the worker's preparation of it takes no time
    from the others' requests."""
    width, height = image.size
    short, long = min(width, height), max(width, height)
    if short <= side:
        return None
    size = (side, int(side * long / short))
    size = size if width <= height else size[::-1]
    buffer = io.BytesIO()
    image.convert("RGB").resize(size, Image.BICUBIC).save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


def check_image_sized(data: str, field: str, max_pixels: int) -> tuple[str, tuple[int, int]]:
    """Validate one base64 image; return its base64 and its (width, height).

    Rejects malformed base64, data that is not an image, truncated images, and images over
    `max_pixels` (decompression bombs included), each with a message naming `field`.
    """
    return _unprefixed(data), decoded(_base64(data, field), field, max_pixels).size


def _unprefixed(data: str) -> str:
    """The base64 of a data URL (or the base64 as given)."""
    return data.partition(DATA_URL_MARK)[2] if data.startswith("data:") else data


def _base64(data: str, field: str) -> bytes:
    """The bytes of a base64 image or data URL, or a clear error naming `field`."""
    if data.startswith("data:"):
        head, sep, rest = data.partition(DATA_URL_MARK)
        if not sep or not head[5:].startswith("image/"):
            raise BadRequest(f"{field}: a data URL must be data:image/...;base64,...")
        data = rest
    try:
        return base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest(f"{field}: not valid base64") from None


def decoded(raw: bytes, field: str, max_pixels: int) -> Image.Image:
    """The image in `raw`, fully decoded; a clear error naming `field` for anything else: no
    data, not an image, corrupt or truncated, or over `max_pixels` (checked from its header,
    before decoding: decompression bombs included)."""
    if not raw:
        raise BadRequest(f"{field}: empty image", param=field)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            image = Image.open(io.BytesIO(raw))
            width, height = image.size
            if width * height > max_pixels:
                raise PayloadTooLarge(
                    f"{field}: image is {width}x{height} pixels; the limit is {max_pixels} pixels",
                    param=field,
                )
            image.load()  # decodes fully: truncated data fails here
            return image
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise PayloadTooLarge(
            f"{field}: image is too large to decode (decompression bomb)", param=field
        ) from None
    except UnidentifiedImageError:
        raise BadRequest(
            f"{field}: not an image (PNG, JPEG, GIF, WebP, BMP are accepted)", param=field
        ) from None
    except (OSError, SyntaxError, ValueError) as exc:
        raise BadRequest(f"{field}: corrupt or truncated image ({exc})", param=field) from None
