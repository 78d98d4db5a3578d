"""Hand a job to the workers and relay what they stream back, holding the tenant's slot.

One path under every API family: `submit` admits, enqueues and waits for the first chunk;
`live` relays the rest of a streamed answer, `complete` gathers an answer that is not
streamed; `resume` follows the stream of a job whose client left (api.relay.Job.abandon).
"""

import json
import time
from collections.abc import AsyncIterator

import anyio
from fastapi import Request

from api.admission import Lease
from api.errors import (
    ApiError,
    BadRequest,
    ClientGone,
    GatewayTimeout,
    NotFound,
    PaymentRequired,
    TooManyRequests,
    UpstreamError,
)
from api.relay import ATTACHED_TTL_SECONDS, POLL_MS, Chunk, Job, JobMeta
from api.state import AppState
from billing.tenants import KeyOwner
from workers.contract import (
    AnyChunk,
    ChatJob,
    ErrorChunk,
    ImageJob,
    TokenChunk,
    attached_key,
    decode_chunk,
    is_final,
    meta_key,
    stream_key,
)


async def submit(
    state: AppState, spec: ChatJob | ImageJob, owner: KeyOwner, family: str, request: Request
) -> tuple[Job, Chunk]:
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
