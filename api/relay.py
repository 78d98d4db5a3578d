"""One admitted job, seen from the gateway: its slot, its task, and the stream of its chunks.

`Job.chunks` relays the chunks one by one (streamed answers), `Job.settled` hands them over
once the final one is there (answers that are not streamed), `Job.abandon` keeps a job whose
streaming client left for a grace period in which it can be resumed (`api.dispatch.resume`).
"""

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from api.admission import Lease
from api.errors import ApiError, GatewayTimeout, Unavailable
from api.state import AppState
from workers.contract import (
    AnyChunk,
    ChatJob,
    DoneChunk,
    ImageJob,
    ImagesChunk,
    attached_key,
    cancel_key,
    claim_key,
    decode_chunk,
    done_key,
    is_final,
    send_job,
    started_key,
    stream_key,
)

log = logging.getLogger(__name__)

POLL_MS = 500
ATTACHED_TTL_SECONDS = 3
Chunk = AnyChunk


@dataclass(frozen=True)
class JobMeta:
    """What a resumed stream needs: whose job it is and how its stream is rendered."""

    tenant_id: str
    family: str  # ollama-chat | ollama-generate | openai-chat
    model: str
    created: float  # unix time

    def dump(self) -> str:
        return json.dumps(self.__dict__)


class Job:
    """One admitted request: its slot, its task, and the stream of its chunks."""

    def __init__(self, state: AppState, job: ChatJob | ImageJob, lease: Lease, tier: str):
        self.state = state
        self.job = job
        self.lease = lease
        self.tier = tier
        state.metrics.in_flight.labels(tier).inc()
        self.finished = False
        self.delivered = 0  # chunks handed out so far (the next chunk's index)
        self._last_id = "0-0"
        self._released = False
        # The lease is renewed on the gateway's clock, not the client's: a slow reader keeps
        # its slot.
        state.leases.hold(lease)

    @property
    def request_id(self) -> str:
        return self.job.request_id

    async def enqueue(self) -> None:
        try:
            await anyio.to_thread.run_sync(send_job, self.state.celery, self.job)
        except (KombuError, OSError) as exc:
            raise Unavailable(f"the job queue is unavailable ({exc}); try again shortly") from exc

    async def chunks(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[Chunk]:
        """The job's chunks, in order, until its final one (which also frees the slot).

        `disconnected`, if given, is asked about twice a second; when it says True the job
        is cancelled and iteration ends.
        """
        key = stream_key(self.request_id)
        heard_at = asked_at = time.monotonic()
        while not self.finished:
            try:
                reply = await self.state.redis.xread({key: self._last_id}, count=64, block=POLL_MS)
                if not reply and await self._worker_lost():
                    # Its last words may have landed just before its claim went: read once more.
                    reply = await self.state.redis.xread({key: self._last_id}, count=64)
                    if not reply:
                        raise await self._given_up_as_lost()
            except RedisError as exc:
                raise Unavailable(f"lost the connection to the job stream ({exc})") from exc
            now = time.monotonic()
            if disconnected is not None and now - asked_at >= POLL_MS / 1000:
                asked_at = now
                if await disconnected():
                    await self.cancel()
                    return
            if not reply:
                await self._check_waiting(now - heard_at)
                continue
            heard_at = now
            for entry_id, fields in reply[0][1]:
                yield await self._accept(entry_id, fields)
                if self.finished:
                    return

    async def settled(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[Chunk]:
        """The job's remaining chunks, read in one go once its final one is there: for an
        answer that is not streamed, one wait and one read, where `chunks` reads once per
        token or progress step. The worker signals the final chunk on a list of its own
        (`workers.streams.JobChannel.publish_final`); twice a second meanwhile this watches
        what `chunks` watches: the client, the worker, a model gone silent."""
        redis = self.state.redis
        signal, key = done_key(self.request_id), stream_key(self.request_id)
        heard_at, length = time.monotonic(), -1
        while not self.finished:
            try:
                signalled = await redis.blpop([signal], timeout=POLL_MS / 1000)
                if signalled or await self._worker_lost():
                    after = "-" if self._last_id == "0-0" else f"({self._last_id}"
                    entries = await redis.xrange(key, min=after)
                    if not signalled and not any(is_final(decode_chunk(f)) for _, f in entries):
                        raise await self._given_up_as_lost()
                else:
                    if disconnected is not None and await disconnected():
                        await self.cancel()
                        return
                    now, seen = time.monotonic(), await redis.xlen(key)
                    if seen != length:
                        heard_at, length = now, seen
                    await self._check_waiting(now - heard_at)
                    continue
            except RedisError as exc:
                raise Unavailable(f"lost the connection to the job stream ({exc})") from exc
            for entry_id, fields in entries:
                yield await self._accept(entry_id, fields)
                if self.finished:
                    return

    async def _accept(self, entry_id, fields) -> Chunk:
        """One chunk read from the stream, in order; its final one ends the job."""
        self._last_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        chunk = decode_chunk(fields)
        if is_final(chunk):
            # The work is over: the slot is free before the client hears so.
            self.finished = True
            await self.close()
            self._count(chunk)
        self.delivered += 1
        return chunk

    def _count(self, chunk: AnyChunk) -> None:
        metrics = self.state.metrics
        if isinstance(chunk, DoneChunk | ImagesChunk):
            family = "sd" if isinstance(chunk, ImagesChunk) else "llava"
            metrics.gpu_seconds.labels(family, self.tier).inc(chunk.gpu_seconds)
            cancelled = getattr(chunk, "done_reason", None) == "cancelled" or getattr(
                chunk, "cancelled", False
            )
            outcome = "cancelled" if cancelled else "completed"
        else:
            outcome = str(getattr(chunk, "status", "error"))
        metrics.jobs.labels(self.job.model, self.tier, outcome).inc()

    async def _given_up_as_lost(self) -> Unavailable:
        """Its worker died: the job is cancelled (a redelivery records it unbilled); the error
        to raise."""
        await self.cancel()
        return Unavailable(
            "the worker running this request was lost; it was not billed, please retry"
        )

    async def _worker_lost(self) -> bool:
        """A worker started the job, and its claim has expired: the worker died."""
        started = await self.state.redis.exists(started_key(self.request_id))
        return bool(started) and not await self.state.redis.exists(claim_key(self.request_id))

    async def _check_waiting(self, silent_for: float) -> None:
        settings = self.state.settings
        if self._last_id != "0-0":
            if silent_for > settings.idle_timeout_seconds:
                await self.cancel()
                raise GatewayTimeout(
                    f"the model sent nothing for {settings.idle_timeout_seconds:.0f}s; "
                    "request cancelled"
                )
            return
        if silent_for > settings.queue_timeout_seconds and not await self.state.redis.exists(
            started_key(self.request_id)
        ):
            await self.cancel()
            raise Unavailable(
                f"no worker took the request within {settings.queue_timeout_seconds:.0f}s; "
                "the service is overloaded or no worker is running"
            )

    async def cancel(self) -> None:
        """Ask the worker to stop (or never to start) this job."""
        self.finished = True
        await self.state.redis.set(
            cancel_key(self.request_id), "1", ex=int(self.state.settings.idle_timeout_seconds) + 600
        )

    async def close(self) -> None:
        """Free the slot; if the job has not finished, cancel it first. Safe to repeat."""
        if self._released:
            return
        self._released = True
        self.state.metrics.in_flight.labels(self.tier).dec()
        self.state.leases.drop(self.lease)
        with anyio.CancelScope(shield=True):
            try:
                if not self.finished:
                    await self.cancel()
                await self.state.admission.release(self.lease)
            except RedisError:
                # The lease expires by itself within its TTL; nothing more can be done now.
                log.warning(
                    "could not release the slot of %s; it expires with its lease", self.request_id
                )

    async def abandon(self) -> None:
        """The streaming client went away: keep the job for a resume, or cancel it now."""
        grace = self.state.settings.resume_grace_seconds
        if self.finished or grace <= 0:
            await self.close()
            return
        self.state.spawn(self._supervise(grace))

    async def _supervise(self, grace: float) -> None:
        """Relay nowhere while someone may resume; cancel once nobody has for `grace` s."""
        deadline = time.monotonic() + grace

        async def nobody_reading() -> bool:
            nonlocal deadline
            if await self.state.redis.exists(attached_key(self.request_id)):
                deadline = time.monotonic() + grace
            return time.monotonic() > deadline

        try:
            async for _ in self.chunks(disconnected=nobody_reading):
                pass
        except ApiError as exc:
            log.info("abandoned job %s ended: %s", self.request_id, exc.message)
        finally:
            await self.close()
