"""The one path from an admitted request to a Celery message, and the handle a synchronous
request holds until its end.

`take_slot` gives the job a slot in its tenant's lease semaphore with its metadata written in
the same Lua step (refused: nothing held, nothing written); `enqueue` sends its message (not
sent: the slot back). Synchronous requests (`submit`, every API family), async jobs and batch
lines (`api.pipeline.scheduler`) all go through both. A synchronous request then holds a `Job`:
`opened` waits for its first chunk (an early error keeps its status) and `live` relays the
rest to a streaming response; `complete` reads an answer that is not streamed in one go once
its final chunk is signalled. A streaming client that leaves abandons its job for a grace
period in which `api/deferred/resume.py` can pick its stream up. The worker gives the slot back with
the final chunk; the gateway gives it back on every other ending.
"""

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager

import anyio
from fastapi import Request
from fastapi.responses import StreamingResponse
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from api.access.admission import Lease
from api.errors import (
    ApiError,
    ClientGone,
    PaymentRequired,
    TooManyRequests,
    Unavailable,
    UpstreamError,
)
from api.inputs.tools import gathered
from api.pipeline import store
from api.pipeline.queue_wait import wait_for_slot
from api.pipeline.store import Family, JobMeta
from api.pipeline.stream import Chunk, Disconnected, JobStream
from api.state import AppState
from billing.tenants import KeyOwner
from config import logs, traces
from workers.contract import (
    ChatJob,
    DoneChunk,
    ErrorChunk,
    ImageJob,
    ImagesChunk,
    TokenChunk,
    is_final,
)
from workers.keyspace import attached_key, meta_key

log = logging.getLogger(__name__)
# How long a cancelled job's final chunk (what it ran) is waited for, to count it.
COUNT_WAIT_SECONDS = 120

Spec = ChatJob | ImageJob


async def take_slot(
    state: AppState, tenant_id: str, tier: str, job_id: str, meta: JobMeta
) -> Lease:
    """A slot for the job, its metadata written in the same step (429 if the tenant is at
    its tier's limit, 503 if Redis is away: nothing held, nothing written)."""
    record = (meta_key(job_id), meta.dump(), state.settings.stream_retention_seconds)
    return await state.admission.acquire(tenant_id, tier, job_id, record)


async def enqueue(
    state: AppState, lease: Lease, spec: Spec, tier: str, band: int, recorded: bool = False
) -> int:
    """Offer the job, which holds its slot, to the fleet: sent to a worker now if one has room
    and nothing waits before it, else ready for the dispatcher (api/pipeline/fleet.py).
    Returns its place among the ready jobs (0: sent now). If it cannot be sent (503 when the
    broker is away), its slot is given back."""
    try:
        return await state.fleet.offer(spec, tier, band, recorded)
    except BaseException as exc:
        with anyio.CancelScope(shield=True):
            await _release(state, lease)
        if isinstance(exc, KombuError | OSError):
            raise Unavailable(f"the job queue is unavailable ({exc}); try again shortly") from exc
        raise


async def check_quota(state: AppState, owner: KeyOwner, fresh: bool = False) -> str:
    """The tenant's current tier, after checking that its plan still covers another request
    this billing period (HTTP 402 if not). Read from the ledger at most once a second or so
    per tenant (`api.access.quota`); `fresh` reads it now."""
    return (await state.quotas.check(owner.tenant_id, fresh)).tier


async def _admit(
    state: AppState, owner: KeyOwner, job_id: str, meta: JobMeta, disconnected: Disconnected | None
) -> tuple[str, Lease]:
    """The tenant's tier and a slot (402 if refused). A refusal is decided on the tenant's
    current tier: if a cached one refuses, it is read again. Over the tier, the request waits
    in its tenant's queue (behind any request or job already there) for up to
    GPUHOST_ADMISSION_WAIT_SECONDS, then gets 429; with no wait, 429 at once."""
    tenant = str(owner.tenant_id)
    view = await state.quotas.check(owner.tenant_id)
    tier = view.tier
    waits = state.settings.admission_wait_seconds > 0
    if not (waits and await store.queue_length(state.redis, tenant)):
        try:
            return tier, await take_slot(state, tenant, tier, job_id, meta)
        except TooManyRequests:
            if not (view.cached or waits):
                raise
        if view.cached:
            tier = await check_quota(state, owner, fresh=True)
            try:
                return tier, await take_slot(state, tenant, tier, job_id, meta)
            except TooManyRequests:
                if not waits:
                    raise
    return tier, await wait_for_slot(state, tier, job_id, meta, disconnected)


async def submit(
    state: AppState,
    spec: Spec,
    owner: KeyOwner,
    family: Family,
    request: Request,
    finish: Callable[[Spec], Awaitable[Spec]] | None = None,
) -> "Job":
    """Admit and enqueue a synchronous request. Everything that fails here releases the slot;
    the caller owns the returned job and ends it through `opened` + `live` (a streamed
    answer) or `complete` (one that is not). A client that leaves while the request waits
    for a slot takes it out of the queue. `finish`: work the request needs before it is sent
    and only once it is admitted, within its tier (images fetched by URL): it returns the
    spec to send; if it fails, the slot is freed."""
    logs.bind(request_id=spec.request_id, tenant_id=owner.tenant_id, model=spec.model)
    tools = tuple(tool.model_dump() for tool in getattr(spec, "tools", ()))
    meta = JobMeta(str(owner.tenant_id), family, spec.model, time.time(), tools)
    about = {"request_id": spec.request_id, "tenant_id": owner.tenant_id, "model": spec.model}
    try:
        with traces.span("admission", **about):  # the wait for a slot included
            tier, lease = await _admit(state, owner, spec.request_id, meta, request.is_disconnected)
    except (PaymentRequired, TooManyRequests) as refused:
        state.metrics.refused.labels(owner.tier, str(refused.status)).inc()
        raise
    job = Job(state, spec, lease, tier)
    async with job.ended_on_error():
        if finish is not None:
            spec = job.spec = await finish(spec)
        band = state.settings.plans[tier].band
        # the broker hop: the job carries this span's context, the worker's span its child
        with traces.span("enqueue", kind=traces.PRODUCER, tier=tier, **about) as sending:
            spec.trace = traces.carrier()
            job.queue_position = await enqueue(state, lease, spec, tier, band)
            if job.queue_position is not None:
                sending.set_attribute("queue_position", job.queue_position)
        job.sent = True
    return job


async def _release(state: AppState, lease: Lease) -> None:
    try:
        await state.admission.release(lease)
    except RedisError:
        # The lease expires by itself within its TTL; nothing more can be done now.
        log.warning("could not release the slot of %s; it expires with its lease", lease.holder)


class Job:
    """One admitted synchronous request: its slot, its task, and its stream."""

    def __init__(self, state: AppState, spec: Spec, lease: Lease, tier: str):
        self.state = state
        self.spec = spec
        self.lease = lease
        self.tier = tier
        self.stream = JobStream(state.redis, spec.request_id, state.settings)
        self._released = False
        self._slot_given_back = False  # by the worker, with the job's final chunk
        self.sent = False  # offered to the fleet: a worker will report how it ended
        self.queue_position = 0  # its place among the ready jobs when offered (0: sent now)
        self._counted = False  # its final chunk is in the metrics
        self.admitted = time.perf_counter()
        state.metrics.in_flight.labels(tier).inc()
        # The lease is renewed on the gateway's clock, not the client's: a slow reader keeps
        # its slot.
        state.leases.hold(lease)

    @property
    def request_id(self) -> str:
        return self.spec.request_id

    @property
    def headers(self) -> dict[str, str]:
        """Its answer's headers: the request id (its usage record's), and its place among
        the requests waiting for a worker when it was admitted (0: a worker had room)."""
        return {"X-Request-Id": self.request_id, "X-Queue-Position": str(self.queue_position)}

    @property
    def finished(self) -> bool:
        return self.stream.ended

    async def chunks(self, disconnected: Disconnected | None = None) -> AsyncIterator[Chunk]:
        """The job's chunks one by one, until its final one (which also frees the slot)."""
        async for chunk in self.stream.follow(disconnected):
            if is_final(chunk):
                await self._ended(chunk)
            yield chunk

    async def settled(self, disconnected: Disconnected | None = None) -> AsyncIterator[Chunk]:
        """The job's remaining chunks, in one read once its final one is there."""
        async for chunk in self.stream.settled(disconnected):
            if is_final(chunk):
                await self._ended(chunk)
            yield chunk

    def observe_first_chunk(self, seconds: float) -> None:
        family = "sd" if isinstance(self.spec, ImageJob) else "llava"
        self.state.metrics.first_chunk.labels(family).observe(seconds)

    async def _ended(self, chunk: Chunk) -> None:
        """The work is over: the slot is free before the client hears so (the worker gave it
        back with the final chunk, `workers.streams.JobChannel.publish_final`)."""
        self._slot_given_back = True
        self._count(chunk)
        await self.close()

    def _count(self, chunk: Chunk) -> None:
        """The job's final chunk in the metrics, once: its outcome and the GPU-seconds the
        worker reported (which the ledger bills), cancelled jobs' included."""
        if self._counted:
            return
        self._counted = True
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
        metrics.jobs.labels(self.spec.model, self.tier, outcome).inc()

    @asynccontextmanager
    async def ended_on_error(self) -> AsyncIterator[None]:
        """Whatever fails inside ends the job (cancelled, its slot freed); an API error
        carries the request id."""
        try:
            yield
        except ApiError as exc:
            await self.close()
            exc.headers.setdefault("X-Request-Id", self.request_id)
            raise
        except BaseException:
            await self.close()
            raise

    async def close(self) -> None:
        """Free the slot; if the job has not finished, cancel it first. Safe to repeat."""
        if self._released:
            return
        self._released = True
        self.state.metrics.in_flight.labels(self.tier).dec()
        self.state.leases.drop(self.lease)
        with anyio.CancelScope(shield=True):
            if not self.finished:
                try:
                    await self.stream.cancel()
                    if self.queue_position and await self.state.fleet.withdraw(self.spec):
                        self.sent = False  # it never left the fleet: no worker will report
                except RedisError:
                    log.warning("could not cancel %s", self.request_id)
            if not self._slot_given_back:
                await _release(self.state, self.lease)
        if self.sent and not self._counted:
            self.state.spawn(self._count_when_ended())

    async def _count_when_ended(self) -> None:
        """A job that ended before its reader saw its final chunk (cancelled: its client went,
        or an error): the worker still reports what it ran, and the ledger bills it, so the
        metrics count it too, from a reader of its own."""
        reader = JobStream(self.state.redis, self.request_id, self.state.settings)
        with anyio.move_on_after(COUNT_WAIT_SECONDS):
            try:
                async for chunk in reader.settled():
                    if is_final(chunk):
                        self._count(chunk)
            except (ApiError, RedisError) as exc:
                log.info("%s ended unreported: %s", self.request_id, exc)

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


async def opened(job: Job, request: Request) -> Chunk:
    """For a streamed answer: wait for the job's first chunk, so that an early error is
    answered with its status (the slot freed, the request id in its headers) before the
    stream starts. Hand the chunk on to `live`."""
    async with job.ended_on_error():
        waiting = job.chunks(disconnected=request.is_disconnected)
        first = await anext(waiting, None)
        await waiting.aclose()
        if first is None:
            raise ClientGone("the client went away before the answer started")
        if isinstance(first, ErrorChunk):
            raise UpstreamError(first.status, first.message)
    job.observe_first_chunk(time.perf_counter() - job.admitted)
    return first


async def streamed(
    job: Job,
    request: Request,
    frames: Callable[[AsyncIterator[Chunk]], AsyncIterator[str]],
    media_type: str,
    headers: dict[str, str],
    whole: bool = False,
) -> StreamingResponse:
    """A streamed answer, every API family's: the job's first chunk awaited (an early error
    keeps its status), then its chunks in the family's framing (`frames`: NDJSON lines, SSE
    events). `whole`: the text held back and sent whole before the final chunk (with tools
    offered, whether an answer is a call is known only once it is whole)."""
    first = await opened(job, request)
    chunks = live(job, first)
    if whole:
        chunks = gathered(chunks)
    return StreamingResponse(frames(chunks), media_type=media_type, headers=headers)


async def complete(
    job: Job, request: Request, tokens: list[TokenChunk] | None = None
) -> tuple[str, Chunk]:
    """Run a submitted job to its end for a non-streamed answer: the text of its tokens and
    its final chunk (DoneChunk or ImagesChunk), read in one go once it is there; the token
    chunks themselves go into `tokens`, where given (several answers, log probabilities).
    The slot is always freed; a worker's error is raised with its status, and every error
    carries the request id."""
    parts: list[str] = []
    chunk = None
    try:
        async for chunk in job.settled(disconnected=request.is_disconnected):
            if isinstance(chunk, TokenChunk):
                parts.append(chunk.text)
                if tokens is not None:
                    tokens.append(chunk)
        if chunk is None:
            raise ClientGone("the client went away before the answer started")
        if isinstance(chunk, ErrorChunk):
            raise UpstreamError(chunk.status, chunk.message)
        if not is_final(chunk):
            raise UpstreamError(502, "the model's stream ended without a result")
    except ApiError as exc:
        exc.headers.setdefault("X-Request-Id", job.request_id)
        raise
    finally:
        await job.close()
    first_ms = job.stream.first_chunk_ms
    if first_ms is not None and job.lease.granted_ms:  # both Redis server time
        job.observe_first_chunk(max(0.0, (first_ms - job.lease.granted_ms) / 1000))
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
