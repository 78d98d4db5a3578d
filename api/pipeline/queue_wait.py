"""A synchronous request over its tenant's tier waits for a slot instead of being refused.

It joins its tenant's queue, the one the tenant's async jobs wait in (`store.add_waiter`),
behind whatever came first. The schedulers (every gateway runs one) take slots for the heads
of the queues in turn, and hand a waiting request its slot (`store.grant`) instead of
sending it: the request's own gateway sends it, as it sends one admitted at once. It waits at
most GPUHOST_ADMISSION_WAIT_SECONDS, then gets 429; a client that leaves leaves the queue.
A gateway that dies with requests waiting leaves records that expire, and a slot granted to
one of them comes back when its lease expires (nobody renews it).
"""

import asyncio
import time

import anyio
from redis.exceptions import RedisError

from api.access.admission import Lease
from api.errors import REDIS_AWAY, ClientGone, TooManyRequests, Unavailable
from api.pipeline import store
from api.pipeline.store import JobMeta
from api.pipeline.stream import Disconnected
from api.state import AppState
from workers.keyspace import job_record_key

POLL_SECONDS = 0.05


async def wait_for_slot(
    state: AppState, tier: str, job_id: str, meta: JobMeta, disconnected: Disconnected | None
) -> Lease:
    """The slot a scheduler takes for the request when its turn comes; 429 when none came
    within the wait (or the queue is full), 499 when the client left first."""
    settings, redis, tenant = state.settings, state.redis, meta.tenant_id
    limit = state.admission.limit(tier)
    retry = {"Retry-After": str(settings.retry_after_seconds)}
    try:
        await room_in_line(state, tenant, tier)
        await store.add_waiter(redis, job_id, tier, meta, int(settings.admission_wait_seconds) + 60)
    except REDIS_AWAY as exc:
        raise Unavailable(f"admission is unavailable (Redis: {exc}); try again shortly") from exc
    deadline = time.monotonic() + settings.admission_wait_seconds
    try:
        lease = await _granted(redis, tenant, job_id, deadline, disconnected)
    except BaseException:  # the client left, Redis went away, the request was cancelled
        with anyio.CancelScope(shield=True):
            await _leave(state, tenant, job_id)
        raise
    if lease is None:
        await _leave(state, tenant, job_id)
        raise TooManyRequests(
            f"too many requests in flight: the {tier} tier allows {limit} at a time, and "
            f"none came free within {settings.admission_wait_seconds:g} s of waiting; "
            "retry when one finishes",
            headers=retry,
        )
    return lease


async def room_in_line(state: AppState, tenant: str, tier: str) -> None:
    """429 unless the tenant has room in its line: requests and async jobs waiting, and its
    batches under way, at most GPUHOST_ADMISSION_QUEUE_LENGTH together (what a tenant can make
    the shared Redis hold is bounded)."""
    settings = state.settings
    waiting = await store.queue_length(state.redis, tenant)
    waiting += await store.active_batches(state.redis, tenant, settings.admission_queue_length)
    if waiting >= settings.admission_queue_length:
        raise TooManyRequests(
            f"too many requests: the {tier} tier runs {state.admission.limit(tier)} at a time "
            f"and {settings.admission_queue_length} already wait in line (requests, jobs and "
            "batches); retry later",
            headers={"Retry-After": str(settings.retry_after_seconds)},
        )


async def _granted(
    redis, tenant: str, job_id: str, deadline: float, disconnected: Disconnected | None
) -> Lease | None:
    """The lease granted to the waiting request, or None if none was by the deadline."""
    while time.monotonic() < deadline:
        found, granted_ms = await redis.hmget(job_record_key(job_id), "state", "granted_ms")
        if found == store.GRANTED.encode():
            await redis.delete(job_record_key(job_id))
            return Lease(tenant, job_id, int(granted_ms or 0))
        if disconnected is not None and await disconnected():
            raise ClientGone("the client went away while waiting for a slot")
        await asyncio.sleep(POLL_SECONDS)
    return None


async def _leave(state: AppState, tenant: str, job_id: str) -> None:
    """Out of the queue; a slot granted meanwhile goes back."""
    redis = state.redis
    try:
        if await store.move_job(redis, job_id, store.WAITING, store.CANCELLED):
            await store.unqueue(redis, tenant, job_id)
        elif await redis.hget(job_record_key(job_id), "state") == store.GRANTED.encode():
            await state.admission.release(Lease(tenant, job_id))
        await redis.delete(job_record_key(job_id))
    except RedisError:
        pass  # the record expires; a granted slot comes back with its lease
