"""Hand a job to the workers and relay what they stream back, holding the tenant's slot.

One path under every API family: `submit` admits, enqueues and waits for the first chunk;
`Job.chunks` relays the rest; `Job.abandon` handles a client that left mid-stream (the job
runs on for a grace period in which the stream can be resumed with `resume`).
"""

import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

import anyio
from fastapi import Request
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from api.admission import Lease
from api.errors import (
    ApiError,
    BadRequest,
    ClientGone,
    GatewayTimeout,
    NotFound,
    PaymentRequired,
    TooManyRequests,
    Unavailable,
    UpstreamError,
)
from api.state import AppState
from billing.tenants import KeyOwner
from workers.contract import (
    AnyChunk,
    ChatJob,
    DoneChunk,
    ErrorChunk,
    ImageJob,
    ImagesChunk,
    TokenChunk,
    attached_key,
    cancel_key,
    claim_key,
    decode_chunk,
    done_key,
    is_final,
    meta_key,
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


async def submit(
    state: AppState, spec: ChatJob | ImageJob, owner: KeyOwner, family: str, request: Request
) -> tuple["Job", Chunk]:
    """Admit, enqueue, and wait for the first chunk (so that an early error gets its status).

    Everything that fails here releases the slot; the caller owns the returned job and must
    end it with `close()` or `abandon()`.
    """
    meta = JobMeta(str(owner.tenant_id), family, spec.model, time.time())
    record = (meta_key(spec.request_id), meta.dump(), state.settings.stream_retention_seconds)
    try:
        tier, lease = await admit(state, owner, spec.request_id, record)
    except (PaymentRequired, TooManyRequests) as refused:
        state.metrics.refused.labels(owner.tier, str(refused.status)).inc()
        raise
    job = Job(state, spec, lease, tier)
    try:
        admitted = time.perf_counter()
        await job.enqueue()
        waiting = job.chunks(disconnected=request.is_disconnected)
        first = await anext(waiting, None)
        await waiting.aclose()
        if first is not None and not isinstance(first, ErrorChunk):
            models = "sd" if isinstance(spec, ImageJob) else "llava"
            state.metrics.first_chunk.labels(models).observe(time.perf_counter() - admitted)
        if first is None:
            raise ClientGone("the client went away before the answer started")
        if isinstance(first, ErrorChunk):
            raise UpstreamError(first.status, first.message)
    except ApiError as exc:
        await job.close()
        exc.headers.setdefault("X-Request-Id", spec.request_id)
        raise
    except BaseException:
        await job.close()
        raise
    return job, first


async def check_quota(state: AppState, owner: KeyOwner, fresh: bool = False) -> str:
    """The tenant's current tier, after checking that its plan still covers another request
    this billing period (HTTP 402 if not). Read from the ledger at most once a second or so
    per tenant (`api.quota`); `fresh` reads it now."""
    return (await state.quotas.check(owner.tenant_id, fresh)).tier


async def admit(
    state: AppState, owner: KeyOwner, request_id: str, record: tuple[str, str, int]
) -> tuple[str, Lease]:
    """The tenant's tier and a slot for the request, its `record` (the job's metadata) written
    with it (402 or 429 if refused, and nothing written). A refusal is decided on the tenant's
    current tier: if a cached one refuses, it is read again."""
    admission = state.admission
    view = await state.quotas.check(owner.tenant_id)
    try:
        return view.tier, await admission.acquire(owner.tenant_id, view.tier, request_id, record)
    except TooManyRequests:
        if not view.cached:
            raise
    tier = await check_quota(state, owner, fresh=True)
    return tier, await admission.acquire(owner.tenant_id, tier, request_id, record)


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
                        await self.cancel()
                        raise Unavailable(
                            "the worker running this request was lost; it was not billed, "
                            "please retry"
                        )
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
                    last = self._last_id
                    last = last.decode() if isinstance(last, bytes) else last
                    after = "-" if last == "0-0" else f"({last}"
                    entries = await redis.xrange(key, min=after)
                    if not signalled and not any(is_final(decode_chunk(f)) for _, f in entries):
                        await self.cancel()
                        raise Unavailable(
                            "the worker running this request was lost; it was not billed, "
                            "please retry"
                        )
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
        self._last_id = entry_id
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


async def resume(
    state: AppState, request_id: str, owner: KeyOwner, after: int
) -> tuple[JobMeta, AsyncIterator[Chunk]]:
    """A job's chunks from index `after` on, for its own tenant only (404 for anyone else)."""
    raw = await state.redis.get(meta_key(request_id))
    meta = JobMeta(**json.loads(raw)) if raw else None
    if meta is None or meta.tenant_id != str(owner.tenant_id):
        raise NotFound(f"job {request_id} not found (unknown, someone else's, or expired)")
    key = stream_key(request_id)
    start = "0-0"
    if after > 0:
        seen = await state.redis.xrange(key, count=after)
        if len(seen) < after:
            raise BadRequest(f"after={after}: the job has sent only {len(seen)} chunks so far")
        start = seen[-1][0]
    return meta, _follow(state, request_id, start)


async def _follow(state: AppState, request_id: str, start) -> AsyncIterator[Chunk]:
    key, last = stream_key(request_id), start
    while True:
        await state.redis.set(attached_key(request_id), "1", ex=ATTACHED_TTL_SECONDS)
        reply = await state.redis.xread({key: last}, count=64, block=POLL_MS)
        if not reply:
            if not await state.redis.exists(meta_key(request_id)):
                raise GatewayTimeout("the job's stream expired")
            continue
        for entry_id, fields in reply[0][1]:
            last = entry_id
            chunk = decode_chunk(fields)
            yield chunk
            if is_final(chunk):
                return


async def complete(job: Job, first: Chunk, request: Request) -> tuple[str, AnyChunk]:
    """Run a submitted job to its end for a non-streamed answer: the text of its tokens and
    its final chunk (DoneChunk or ImagesChunk). The slot is always freed; a worker's error
    is raised with its status, and every error carries the request id."""
    parts: list[str] = []
    chunk = first
    try:
        if not is_final(chunk):
            if isinstance(chunk, TokenChunk):
                parts.append(chunk.text)
            async for chunk in job.settled(disconnected=request.is_disconnected):
                if isinstance(chunk, TokenChunk):
                    parts.append(chunk.text)
        if isinstance(chunk, ErrorChunk):
            raise UpstreamError(chunk.status, chunk.message)
        if not is_final(chunk):
            raise UpstreamError(502, "the model's stream ended without a result")
    except ApiError as exc:
        exc.headers.setdefault("X-Request-Id", job.request_id)
        raise
    finally:
        await job.close()
    return "".join(parts), chunk


async def live(job: Job, first: Chunk) -> AsyncIterator[Chunk]:
    """A submitted job's chunks for a streaming response, from its first one.

    When the response ends early (the client went away), the job is abandoned: it runs on
    for the resume grace period instead of being cancelled at once.
    """
    try:
        yield first
        if not job.finished:
            async for chunk in job.chunks():
                yield chunk
    finally:
        with anyio.CancelScope(shield=True):
            await (job.close() if job.finished else job.abandon())
