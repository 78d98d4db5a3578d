"""What the gateway keeps in Redis about jobs and batches: each job's metadata (whose it is,
how its stream is rendered), async job records, and batch records. Key names and scripts are
`workers.keyspace`'s; every write of these records is here."""

import contextlib
import json
import re
import time
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass
from typing import Literal

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.errors import Conflict, NotFound
from workers.keyspace import (
    BATCHES_ACTIVE,
    BATCHES_EXPIRING,
    HOOKED,
    IN_HAND,
    JOB_GRANT,
    JOB_MOVE,
    SUBMITTED,
    TENANTS_WAITING,
    WAITING_COUNT,
    WAITING_POP,
    WAITING_REQUEUE,
    batch_key,
    batch_running_key,
    batches_index_key,
    idempotency_key,
    job_record_key,
    jobs_index_key,
    meta_key,
    waiting_key,
)

# How a job's stream is rendered to its client: the API family and call that made it.
Family = Literal["ollama-chat", "ollama-generate", "openai-chat", "openai-completion", "images"]

# An async job's record moves waiting -> submitted (a scheduler took it into a slot) or
# waiting -> cancelled; a submitted job's progress is in its stream.
WAITING, SUBMITTED_STATE, CANCELLED = "waiting", "submitted", "cancelled"
# A synchronous request waiting in its tenant's queue (type SYNC) is GRANTED the slot a
# scheduler took for it; its own gateway then sends it (api/pipeline/queue_wait.py).
SYNC, GRANTED = "sync", "granted"


@dataclass(frozen=True)
class JobMeta:
    """Whose job it is and how its stream is rendered: written with the job's slot, read to
    resume its stream."""

    tenant_id: str
    family: Family
    model: str
    created: float  # unix time
    # the tools a chat offered (ToolSpec fields): its answer was streamed whole, a call
    # rendered as a call, and so is a resumed stream
    tools: tuple[dict, ...] = ()

    def dump(self) -> str:
        return json.dumps(asdict(self))

    @classmethod
    async def read(cls, redis: aioredis.Redis, request_id: str) -> "JobMeta | None":
        if not ID.fullmatch(request_id):
            return None
        raw = await redis.get(meta_key(request_id))
        return cls(**json.loads(raw)) if raw else None


# What a job or batch id can look like (request ids are hex; batch lines `batch_<hex>-<n>`):
# anything else, a Redis key's separator or a NUL byte say, names no job of anyone's.
ID = re.compile(r"[A-Za-z0-9_-]{1,128}")


def decoded(raw: dict) -> dict[str, str]:
    return {k.decode(): v.decode() for k, v in raw.items()}


def known_id(kind: str, value: str) -> str:
    """`value`, if it can be a job's or batch's id; else 404 (it names nothing)."""
    if not ID.fullmatch(value):
        raise NotFound(f"{kind} {value!r} not found")
    return value


async def _owned(redis: aioredis.Redis, kind: str, key: str, some_id: str, tenant_id) -> dict:
    record = decoded(await redis.hgetall(key))
    if tenant_id is not None and record.get("tenant_id") != tenant_id:
        raise NotFound(f"{kind} {some_id} not found")
    return record


# -- async jobs ---------------------------------------------------------------------------


async def job_record(redis: aioredis.Redis, job_id: str, tenant_id: str | None = None) -> dict:
    """An async job's record; with `tenant_id`, 404 unless it is that tenant's (and an async
    job's: a synchronous request waiting for a slot is no job of the API's)."""
    key = job_record_key(known_id("job", job_id))
    record = await _owned(redis, "job", key, job_id, tenant_id)
    if tenant_id is not None and record.get("type") == SYNC:
        raise NotFound(f"job {job_id} not found")
    return record


async def claim_idempotency(
    redis: aioredis.Redis, job_id: str, fingerprint: str, retention: int
) -> bool:
    """True if this Idempotency-Key is new (its job is to be made now), False if it made a job
    for the same request before; 409 if for another request."""
    key = idempotency_key(job_id)
    if await redis.set(key, fingerprint, nx=True, ex=retention):
        return True
    if await redis.get(key) != fingerprint.encode():
        raise Conflict("this Idempotency-Key was used with a different request")
    return False


async def release_idempotency(redis: aioredis.Redis, job_id: str) -> None:
    """The job an Idempotency-Key was claimed for was not made: the key is free again (best
    effort: Redis may be the reason it was not made)."""
    with contextlib.suppress(RedisError):  # it expires with the retention time
        await redis.delete(idempotency_key(job_id))


async def add_waiting_job(
    redis: aioredis.Redis, job_id: str, record: dict, retention: int, hooked: bool, now: float
) -> None:
    """A new async job, in its tenant's queue and index (and watched for webhook events)."""
    tenant = record["tenant_id"]
    pipe = redis.pipeline(transaction=True)
    pipe.hset(job_record_key(job_id), mapping=record | {"state": WAITING})
    pipe.expire(job_record_key(job_id), retention)
    pipe.zadd(jobs_index_key(tenant), {job_id: now})
    pipe.expire(jobs_index_key(tenant), retention)
    pipe.rpush(waiting_key(tenant), job_id)
    pipe.sadd(TENANTS_WAITING, tenant)
    if hooked:
        pipe.sadd(HOOKED, job_id)
    await pipe.execute()


async def add_waiter(
    redis: aioredis.Redis, job_id: str, tier: str, meta: JobMeta, ttl: int
) -> None:
    """A synchronous request, last in its tenant's queue until a scheduler grants it a slot."""
    tenant = meta.tenant_id
    record = {"type": SYNC, "state": WAITING, "tenant_id": tenant, "tier": tier}
    pipe = redis.pipeline(transaction=True)
    pipe.hset(job_record_key(job_id), mapping=record | {"meta": meta.dump()})
    pipe.expire(job_record_key(job_id), ttl)
    pipe.rpush(waiting_key(tenant), job_id)
    pipe.sadd(TENANTS_WAITING, tenant)
    await pipe.execute()


async def grant(redis: aioredis.Redis, job_id: str, granted_ms: int) -> bool:
    """Hand a waiting synchronous request the slot taken for it; False if it left meanwhile
    (the caller gives the slot back)."""
    args = (WAITING, GRANTED, str(granted_ms))
    return bool(await redis.eval(JOB_GRANT, 1, job_record_key(job_id), *args))


async def queue_length(redis: aioredis.Redis, tenant: str) -> int:
    """Requests and jobs the tenant has waiting: in its queue, or in a scheduler's hand on
    their way out of it (put back, or started, a moment later: until then they still wait)."""
    return await redis.eval(WAITING_COUNT, 2, waiting_key(tenant), IN_HAND, tenant)


async def move_job(redis: aioredis.Redis, job_id: str, from_state: str, to_state: str) -> bool:
    """Move the job's state on if it is `from_state` (the first mover wins)."""
    return bool(await redis.eval(JOB_MOVE, 1, job_record_key(job_id), from_state, to_state))


async def next_waiting(redis: aioredis.Redis) -> list[tuple[str, str]]:
    """(tenant, job id): the next waiting job of each tenant that has one, taken off its
    queue (`requeue` puts one back first in line); tenants with none left leave the set.
    Each stays noted in IN_HAND until `placed` (or put back by `put_back_in_hand`)."""
    taken = []
    for raw in await redis.smembers(TENANTS_WAITING):
        tenant = raw.decode()
        keys = (waiting_key(tenant), TENANTS_WAITING, IN_HAND)
        job_id = await redis.eval(WAITING_POP, 3, *keys, tenant)
        if job_id is not None:
            taken.append((tenant, job_id.decode()))
    return taken


async def placed(redis: aioredis.Redis, job_id: str) -> None:
    """A job taken off its queue has its slot and its next step, or is back in line."""
    await redis.hdel(IN_HAND, job_id)


async def put_back_in_hand(redis: aioredis.Redis) -> int:
    """Jobs a scheduler took off their queues and never placed (Redis failed under it, or it
    died): each back first in line, one marked submitted but never sent too. Called by the
    scheduler that holds TAKING, before it takes any. Returns how many."""
    count = 0
    for raw_id, raw_tenant in (await redis.hgetall(IN_HAND)).items():
        job_id, tenant = raw_id.decode(), raw_tenant.decode()
        state = await redis.hget(job_record_key(job_id), "state")
        if state == WAITING.encode():
            await requeue(redis, tenant, job_id)
            count += 1
        elif state == SUBMITTED_STATE.encode() and not await redis.hexists(SUBMITTED, job_id):
            await unsubmit(redis, job_id, tenant)
            count += 1
        await placed(redis, job_id)
    return count


async def requeue(redis: aioredis.Redis, tenant: str, job_id: str) -> None:
    """First in line again, its tenant among those with jobs waiting, if it still waits."""
    keys = (job_record_key(job_id), waiting_key(tenant), TENANTS_WAITING)
    await redis.eval(WAITING_REQUEUE, 3, *keys, WAITING, job_id, tenant)


async def unqueue(redis: aioredis.Redis, tenant: str, job_id: str) -> None:
    await redis.lrem(waiting_key(tenant), 0, job_id)


async def has_waiting(redis: aioredis.Redis, tenant: str) -> bool:
    return bool(await queue_length(redis, tenant))


async def keep_lease(redis: aioredis.Redis, job_id: str, tenant: str, at: float) -> None:
    """The job holds its slot and goes to the fleet (at `at`: its submission time): the
    schedulers keep its lease until a worker starts it. The fleet notes when it is sent to a
    worker (`sent_at`)."""
    pipe = redis.pipeline(transaction=False)
    pipe.hset(job_record_key(job_id), "submitted_at", str(at))
    pipe.hset(SUBMITTED, job_id, tenant)
    await pipe.execute()


async def unsubmit(redis: aioredis.Redis, job_id: str, tenant: str) -> None:
    """A job that could not be enqueued waits first in line again."""
    await redis.hset(job_record_key(job_id), "state", WAITING)
    await redis.hdel(SUBMITTED, job_id)
    await requeue(redis, tenant, job_id)


async def _page(
    redis: aioredis.Redis, index: str, limit: int, after: str | None, what: str
) -> tuple[list[str], bool]:
    """A page of a tenant's index (newest first) after the id `after` (404 if it is not in
    it), and whether more follow."""
    start = 0
    if after is not None:
        rank = await redis.zrevrank(index, after)
        if rank is None:
            raise NotFound(f"field 'after': no {what} '{after}'", param="after")
        start = rank + 1
    ids = [raw.decode() for raw in await redis.zrevrange(index, start, start + limit)]
    return ids[:limit], len(ids) > limit


async def tenant_job_ids(
    redis: aioredis.Redis, tenant: str, limit: int, after: str | None = None
) -> tuple[list[str], bool]:
    """A page of the tenant's job ids, newest first, and whether more follow."""
    return await _page(redis, jobs_index_key(tenant), limit, after, "job")


async def views_of(ids: list[str], view: Callable[[str], Awaitable[dict]]) -> list[dict]:
    """A tenant's listing: the view of each id still kept (a record may expire before its
    entry in the tenant's index does)."""
    views = []
    for known in ids:
        try:
            views.append(await view(known))
        except NotFound:
            continue
    return views


# -- batches ------------------------------------------------------------------------------


async def batch_record(redis: aioredis.Redis, batch_id: str, tenant_id: str | None = None) -> dict:
    """A batch's record; with `tenant_id`, 404 unless it is that tenant's."""
    key = batch_key(known_id("batch", batch_id))
    return await _owned(redis, "batch", key, batch_id, tenant_id)


async def add_batch(redis: aioredis.Redis, batch_id: str, record: dict, now: float) -> None:
    pipe = redis.pipeline(transaction=True)
    pipe.hset(batch_key(batch_id), mapping=record)
    pipe.zadd(batches_index_key(record["tenant_id"]), {batch_id: now})
    pipe.sadd(BATCHES_ACTIVE, batch_id)
    await pipe.execute()


async def cancel_batch(redis: aioredis.Redis, batch_id: str) -> str:
    """Its lines not started never run; the batch runner stops the running ones. When the
    cancelling began (unix seconds, as text)."""
    now = str(time.time())
    await redis.hset(batch_key(batch_id), mapping={"status": "cancelling", "cancelling_at": now})
    return now


async def active_batches(redis: aioredis.Redis, tenant: str, most: int) -> int:
    """How many of the tenant's newest `most` batches are under way."""
    ids = await redis.zrevrange(batches_index_key(tenant), 0, most - 1)
    if not ids:
        return 0
    return sum(await redis.smismember(BATCHES_ACTIVE, ids))


async def tenant_batch_ids(
    redis: aioredis.Redis, tenant: str, limit: int, after: str | None = None
) -> tuple[list[str], bool]:
    """A page of the tenant's batch ids, newest first, and whether more follow."""
    return await _page(redis, batches_index_key(tenant), limit, after, "batch")


async def add_line_job(
    redis: aioredis.Redis, batch_id: str, index: int, job_id: str, record: dict, retention: int
) -> None:
    """A batch line becomes a job (already holding its slot): its record, and the batch's
    running lines and next line moved on, in one transaction."""
    pipe = redis.pipeline(transaction=True)
    pipe.hset(job_record_key(job_id), mapping=record | {"state": SUBMITTED_STATE})
    pipe.expire(job_record_key(job_id), retention)
    pipe.hset(batch_running_key(batch_id), job_id, index)
    pipe.hincrby(batch_key(batch_id), "next", 1)
    await pipe.execute()


async def drop_line_job(redis: aioredis.Redis, batch_id: str, job_id: str) -> None:
    """Undo `add_line_job` for a line that could not be enqueued (tried again next pass)."""
    pipe = redis.pipeline(transaction=True)
    pipe.hdel(batch_running_key(batch_id), job_id)
    pipe.delete(job_record_key(job_id))
    pipe.hincrby(batch_key(batch_id), "next", -1)
    await pipe.execute()


async def end_batch(
    redis: aioredis.Redis,
    batch_id: str,
    ended: dict[str, str],
    files: str,
    retention: int,
    now: float,
) -> None:
    """The batch ended (`ended`: its status and what else it ended with): its record kept
    `retention` seconds, its working files (`files`) deleted then."""
    pipe = redis.pipeline(transaction=True)
    pipe.hset(batch_key(batch_id), mapping=ended | {"finished_at": str(now)})
    pipe.expire(batch_key(batch_id), retention)
    pipe.srem(BATCHES_ACTIVE, batch_id)
    pipe.zadd(BATCHES_EXPIRING, {files: now + retention})
    await pipe.execute()
