"""The fleet: which admitted job a worker runs next, decided by the gateways, not by the
broker's first-come-first-served queue.

A job that holds its tenant's slot is offered to the fleet (`offer`). While the workers of its
model have room for it and no job waits that would go before it, it is handed to the broker at
once (FLEET_OFFER, one step in Redis, so that replicas never hand out more than the room).
Otherwise it is kept ready, its message in Redis, and the dispatcher (every gateway runs one;
one at a time hands jobs out) hands ready jobs out as room comes (a slot given back wakes it
if a job waits), in the order `api.pipeline.fleet_order` decides: aging, bands, fair share,
and the room free traffic leaves to paying plans.

The room is the workers' own: each publishes how many requests it takes at once (its request
threads); a job counts as running from being handed out until its slot is given back (by its
worker with its final chunk, or by whoever ends it), so the count is exact and never waits on
a worker's next status. A job refused when it would start (its tenant's allowance spent since
it was admitted) ends with the 402 it would have got at the door, unbilled.
"""

import contextlib
import json
import logging
import time
import uuid
from typing import TYPE_CHECKING

import anyio
import redis.asyncio as aioredis
from kombu.exceptions import KombuError
from redis.exceptions import LockError, RedisError

from api.access.admission import Lease
from api.errors import PaymentRequired
from api.pipeline.fleet_book import Book
from api.pipeline.fleet_order import (
    BATCH_BAND,
    Ready,
    next_job,
    open_to,
    reserve,
)
from workers.contract import (
    LLAVA_QUEUE,
    QUEUES,
    SD_QUEUE,
    ChatJob,
    ErrorChunk,
    ImageJob,
    WorkerStatus,
    encode_chunk,
    send_job,
)
from workers.fleet_keys import (
    FLEET_LOCK,
    FLEET_OFFER,
    FLEET_START,
    FLEET_WAKE,
    fleet_key,
    fleet_order,
    fleet_spec_key,
)
from workers.keyspace import (
    WORKER_KEY_PREFIX,
    cancel_key,
    done_key,
    job_record_key,
    slots_key,
    stream_key,
)

if TYPE_CHECKING:
    from api.state import AppState

log = logging.getLogger(__name__)
SLOT_LAPSED = (
    "the request's slot lapsed while it waited for room on the workers (the gateway holding "
    "it was too slow to renew it); it did not run and is not billed: try again"
)

FLEET_PARTS = ("capacity", "running", "order", "ready", "aging")  # the scripts' keys
STATUS_FRESH_SECONDS = 5.0  # a worker whose status is older is not counted
DISPATCH_EVERY = 0.1  # the longest a dispatcher waits without a slot given back to wake it
CAPACITY_EVERY = 1.0  # how often the dispatcher reads the workers' capacity
LOCK_SECONDS = 15
# How long a message the broker refuses is tried again (each try waits for the connection up
# to Celery's broker_connection_timeout, 4 s) before the request gets 503.
BROKER_RETRY_SECONDS = 10.0


def queue_of(spec: ChatJob | ImageJob) -> str:
    return SD_QUEUE if isinstance(spec, ImageJob) else LLAVA_QUEUE


async def worker_statuses(redis: aioredis.Redis) -> list[WorkerStatus]:
    keys = [key async for key in redis.scan_iter(match=WORKER_KEY_PREFIX + "*", count=100)]
    if not keys:
        return []
    return [WorkerStatus.model_validate_json(raw) for raw in await redis.mget(keys) if raw]


class Fleet:
    def __init__(self, state: "AppState"):
        self.state = state
        self.redis = state.redis
        self._offer = self.redis.register_script(FLEET_OFFER)
        self._start = self.redis.register_script(FLEET_START)
        self._capacity_at = 0.0
        self.book = Book(self.redis, state.settings)

    # -- a job comes -------------------------------------------------------------------------

    async def offer(
        self, spec: ChatJob | ImageJob, tier: str, band: int, recorded: bool = False
    ) -> int:
        """Hand a job that holds its slot to a worker now, or keep it ready for the dispatcher.
        Returns its place among the ready jobs (0: sent now). A message the broker refuses is
        tried again for a while, then raised (the caller gives the slot back)."""
        queue, tenant, job_id = queue_of(spec), str(spec.tenant_id), spec.request_id
        now = time.time()
        entry = Ready(job_id, tenant, tier, band, now, recorded)
        keys = [fleet_key(queue, part) for part in FLEET_PARTS]
        retention = self.state.settings.stream_retention_seconds
        cutoff = now - self.state.settings.fleet_aging_seconds
        arrived_ms = int(now * 1000)
        args = [
            self._reserve(band),
            f"{tenant}/{job_id}",
            arrived_ms,
            job_id,
            json.dumps(entry.__dict__),
            spec.model_dump_json(),
            retention,
            FLEET_WAKE,
            fleet_order(band, arrived_ms),
            fleet_order(band + 1, 0),
            int(band < BATCH_BAND),
            int(cutoff * 1000),
        ]
        place = await self._offer(keys=[*keys, fleet_spec_key(job_id)], args=args)
        if not place:
            try:
                await self._send(spec, recorded)
            except BaseException:
                await self.redis.zrem(fleet_key(queue, "running"), f"{tenant}/{job_id}")
                raise
            self.state.metrics.fleet_wait.labels(tier).observe(0.0)
        return place

    def _reserve(self, band: int) -> int:
        settings = self.state.settings
        return reserve(settings.plans, settings.fleet_reserved_slots, band)

    def _room(self, entries: dict[str, Ready], capacity: bytes | None, running: int):
        return open_to(entries, capacity, running, self._reserve)

    async def withdraw(self, spec: ChatJob | ImageJob) -> bool:
        """A ready job that ended before it started (its client left): out of the fleet.
        True if it was still waiting (it never went to a worker)."""
        return await self.withdraw_id(queue_of(spec), spec.request_id)

    async def withdraw_id(self, queue: str, job_id: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.hdel(fleet_key(queue, "ready"), job_id)
        pipe.zrem(fleet_key(queue, "order"), job_id)
        pipe.zrem(fleet_key(queue, "aging"), job_id)
        pipe.delete(fleet_spec_key(job_id))
        removed, *_ = await pipe.execute()
        return bool(removed)

    async def _send(self, spec: ChatJob | ImageJob, recorded: bool) -> None:
        """Hand the job to the broker; a refusal (restarting) is tried again for up to
        BROKER_RETRY_SECONDS. An async job's record notes when it was sent (`sent_at`: a
        message lost after that is sent again by the schedulers)."""
        deadline = time.monotonic() + BROKER_RETRY_SECONDS
        while True:
            try:
                await anyio.to_thread.run_sync(send_job, self.state.celery, spec)
                break
            except (KombuError, OSError):
                if time.monotonic() >= deadline:
                    raise
                await anyio.sleep(0.5)
        if recorded:
            await self.redis.hset(job_record_key(spec.request_id), "sent_at", str(time.time()))

    # -- the dispatcher: every gateway runs one, one hands jobs out at a time -------------

    async def run(self) -> None:
        """Hand ready jobs out as room comes: woken as soon as a slot is given back or a job
        is kept ready (published on FLEET_WAKE), and every DISPATCH_EVERY at the latest (room
        a worker's status brings, a lease that lapsed)."""
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as wake:
                    await wake.subscribe(FLEET_WAKE)
                    while True:
                        await wake.get_message(timeout=DISPATCH_EVERY)
                        while await wake.get_message(timeout=0):
                            pass  # the wakes that came meanwhile: one pass sees them all
                        await self.dispatch()
            except RedisError as exc:
                log.warning("fleet dispatcher: %s", exc)
                await anyio.sleep(DISPATCH_EVERY)
            except Exception:
                log.exception("fleet dispatcher failed")
                await anyio.sleep(DISPATCH_EVERY)

    async def dispatch(self) -> None:
        lock = self.redis.lock(FLEET_LOCK, timeout=LOCK_SECONDS, blocking=False)
        if not await lock.acquire():
            return
        try:
            await self._read_capacity()
            for queue in QUEUES:
                await self._dispatch(queue)
        finally:
            with contextlib.suppress(LockError):  # expired: another dispatcher may hold it now
                await lock.release()

    async def _read_capacity(self) -> None:
        """Each model's room: the request threads of its workers that answer (their
        statuses); unknown (no gating) while any says nothing of it."""
        now = time.monotonic()
        if now - self._capacity_at < CAPACITY_EVERY:
            return
        self._capacity_at = now
        fresh = [
            s
            for s in await worker_statuses(self.redis)
            if s.loaded and time.time() - s.updated_at < STATUS_FRESH_SECONDS
        ]
        for queue in QUEUES:
            mine = [s for s in fresh if s.queue == queue]
            key = fleet_key(queue, "capacity")
            if mine and all(s.capacity > 0 for s in mine):
                ttl = int(STATUS_FRESH_SECONDS)
                await self.redis.set(key, sum(s.capacity for s in mine), ex=ttl)
            elif mine:
                await self.redis.delete(key)

    async def _dispatch(self, queue: str) -> None:
        capacity, running, entries, served, costs = await self.book.snapshot(queue)
        while entries:
            room = self._room(entries, capacity, sum(running.values()))
            if not room:
                break
            aging = self.state.settings.fleet_aging_seconds
            pick = next_job(room, running, served, costs, time.time(), aging)
            del entries[pick.job_id]
            started = await self._start_one(queue, pick)
            if started is None:
                break  # no room after all (a replica's offer took it), or the broker is away
            if started:
                running[pick.tenant] += 1

    async def _start_one(self, queue: str, entry: Ready) -> bool | None:
        """Start a ready job: True if it went to a worker, False if it was dropped (its
        request ended, or its plan no longer covers it), None if there was no room or the
        broker is away."""
        job_id, tenant = entry.job_id, entry.tenant
        if entry.band < BATCH_BAND or entry.recorded:
            try:  # a request was checked as it came, a job may have waited long: read afresh
                await self.state.quotas.check(uuid.UUID(tenant), fresh=entry.recorded)
            except PaymentRequired as refused:
                if await self.withdraw_id(queue, job_id):
                    await self.end_unstarted(tenant, job_id, 402, refused.message)
                return False
        member = f"{tenant}/{job_id}"
        keys = [
            *(fleet_key(queue, part) for part in FLEET_PARTS),
            fleet_spec_key(job_id),
            cancel_key(job_id),
            slots_key(tenant),
        ]
        raw = await self._start(keys=keys, args=[self._reserve(entry.band), member, job_id])
        if raw == 0:
            return None
        if raw == -1:
            return False  # its request ended: withdrawn
        if raw == -2:  # its slot lapsed while it waited: its reader is told, never left waiting
            await self.end_unstarted(tenant, job_id, 503, SLOT_LAPSED)
            return False
        spec = (ImageJob if queue == SD_QUEUE else ChatJob).model_validate_json(raw)
        try:
            await self._send(spec, entry.recorded)
        except (KombuError, OSError) as exc:  # back in line, first: the next pass tries again
            log.warning("fleet: job %s could not be sent (%s); it waits", job_id, exc)
            await self._unstart(queue, member, entry, raw)
            return None
        self.state.metrics.fleet_wait.labels(entry.tier).observe(time.time() - entry.arrived)
        return True

    async def _unstart(self, queue: str, member: str, entry: Ready, raw: bytes) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(fleet_key(queue, "running"), member)
        pipe.hset(fleet_key(queue, "ready"), entry.job_id, json.dumps(entry.__dict__))
        pipe.set(fleet_spec_key(entry.job_id), raw, ex=self.state.settings.stream_retention_seconds)
        arrived_ms = int(entry.arrived * 1000)
        pipe.zadd(fleet_key(queue, "order"), {entry.job_id: fleet_order(entry.band, arrived_ms)})
        if entry.band < BATCH_BAND:
            pipe.zadd(fleet_key(queue, "aging"), {entry.job_id: arrived_ms})
        await pipe.execute()

    async def end_unstarted(self, tenant: str, job_id: str, status: int, message: str) -> None:
        """End a job that never started, as a worker ends one: an error chunk its reader sees,
        the signal of its end, its slot given back. Nothing ran: nothing is billed."""
        chunk = ErrorChunk(status=status, message=message)
        retention = self.state.settings.stream_retention_seconds
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(stream_key(job_id), encode_chunk(chunk))
        pipe.expire(stream_key(job_id), retention)
        pipe.rpush(done_key(job_id), "1")
        pipe.expire(done_key(job_id), retention)
        await pipe.execute()
        await self.state.admission.release(Lease(tenant, job_id))
