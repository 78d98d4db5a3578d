"""The fleet: which admitted job a worker runs next, decided by the gateways, not by the
broker's first-come-first-served queue.

A job that holds its tenant's slot is offered to the fleet (`offer`). While the workers of its
model have room and nothing waits, it is handed to the broker at once (FLEET_OFFER, one step in
Redis, so that replicas never hand out more than the room). Otherwise it is kept ready, its
message in Redis, and the dispatcher (one gateway's scheduler at a time) hands ready jobs out as
room comes (a job ends and gives its slot back), in this order:

1. a job that has waited longer than the aging bound (GPUHOST_FLEET_AGING_SECONDS), oldest
   first, so that no interactive request is starved while the fleet keeps serving;
2. else the lowest band (`Plan.band`: Max 0, Pro 1, Free 2 by default; batch lines after all);
3. within the band, the tenant that was served the fewest GPU-seconds lately (each tenant's
   served seconds decay with a half-life, GPUHOST_FLEET_FAIR_HALF_LIFE_SECONDS), its running
   jobs counted at what its jobs usually cost, then that tenant's oldest job: a tenant with
   more clients or longer requests does not get more of the fleet.

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
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import redis.asyncio as aioredis
from kombu.exceptions import KombuError
from redis.exceptions import LockError

from api.access.admission import Lease
from api.errors import PaymentRequired
from workers.contract import (
    LLAVA_QUEUE,
    QUEUES,
    SD_QUEUE,
    ChatJob,
    ErrorChunk,
    ImageJob,
    WorkerStatus,
    decode_chunk,
    encode_chunk,
    send_job,
)
from workers.keyspace import (
    FLEET_LOCK,
    FLEET_OFFER,
    FLEET_START,
    WORKER_KEY_PREFIX,
    cancel_key,
    done_key,
    fleet_key,
    fleet_spec_key,
    job_record_key,
    slots_key,
    stream_key,
)

if TYPE_CHECKING:
    from api.state import AppState

log = logging.getLogger(__name__)

BATCH_BAND = 1000  # batch lines: after every plan's band, never aged ahead of them
STATUS_FRESH_SECONDS = 5.0  # a worker whose status is older is not counted
CAPACITY_EVERY = 1.0  # how often the dispatcher reads the workers' capacity
DEFAULT_COST = 1.0  # GPU-seconds a job is taken to cost until its tenant's are known
LOCK_SECONDS = 15
# How long a message the broker refuses is tried again (each try waits for the connection up
# to Celery's broker_connection_timeout, 4 s) before the request gets 503.
BROKER_RETRY_SECONDS = 10.0


def queue_of(spec: ChatJob | ImageJob) -> str:
    return SD_QUEUE if isinstance(spec, ImageJob) else LLAVA_QUEUE


@dataclass(frozen=True)
class Ready:
    """A job admitted and waiting for room."""

    job_id: str
    tenant: str
    tier: str
    band: int
    arrived: float  # unix time it was offered
    recorded: bool  # an async job or batch line (its record notes when it is sent)


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
        keys = [fleet_key(queue, part) for part in ("capacity", "running", "arrivals", "ready")]
        retention = self.state.settings.stream_retention_seconds
        args = [
            f"{tenant}/{job_id}",
            int(now * 1000),
            job_id,
            json.dumps(entry.__dict__),
            spec.model_dump_json(),
            retention,
        ]
        if await self._offer(keys=[*keys, fleet_spec_key(job_id)], args=args):
            try:
                await self._send(spec, recorded)
            except BaseException:
                await self.redis.zrem(fleet_key(queue, "running"), f"{tenant}/{job_id}")
                raise
            self.state.metrics.fleet_wait.labels(tier).observe(0.0)
            return 0
        return await self.position(queue, job_id)

    async def withdraw(self, spec: ChatJob | ImageJob) -> bool:
        """A ready job that ended before it started (its client left): out of the fleet.
        True if it was still waiting (it never went to a worker)."""
        return await self.withdraw_id(queue_of(spec), spec.request_id)

    async def withdraw_id(self, queue: str, job_id: str) -> bool:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(fleet_key(queue, "arrivals"), job_id)
        pipe.hdel(fleet_key(queue, "ready"), job_id)
        pipe.delete(fleet_spec_key(job_id))
        _, removed, _ = await pipe.execute()
        return bool(removed)

    async def position(self, queue: str, job_id: str) -> int:
        """The job's place among the ready jobs (1: next), by band, then arrival; 0 if it is
        not waiting."""
        entries = await self._ready(queue)
        mine = entries.get(job_id)
        if mine is None:
            return 0
        ahead = [
            e
            for e in entries.values()
            if (e.band, e.arrived) < (mine.band, mine.arrived) and e.job_id != job_id
        ]
        return len(ahead) + 1

    async def estimated_start(self, queue: str, position: int) -> float | None:
        """Seconds until a job at `position` starts, if the jobs before it cost what jobs of
        this model have lately, run as many at once as the workers take."""
        capacity = await self.redis.get(fleet_key(queue, "capacity"))
        cost = await self.redis.hget(fleet_key(queue, "cost"), "*")
        if not capacity or int(capacity) <= 0:
            return None
        return round(position * float(cost or DEFAULT_COST) / int(capacity), 1)

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

    # -- the dispatcher: one scheduler at a time, every pass ------------------------------

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
        running = await self._running(queue)
        entries = await self._ready(queue)
        if not entries:
            return
        capacity = await self.redis.get(fleet_key(queue, "capacity"))
        room = int(capacity) - sum(running.values()) if capacity is not None else len(entries)
        served = await self._served(queue)
        costs = await self._costs(queue)
        while room > 0 and entries:
            pick = self._next(entries, running, served, costs)
            del entries[pick.job_id]
            started = await self._start_one(queue, pick)
            if started is None:
                break  # no room after all (a replica's offer took it), or the broker is away
            if started:
                running[pick.tenant] += 1
                room -= 1

    def _next(
        self,
        entries: dict[str, Ready],
        running: Counter,
        served: dict[str, float],
        costs: dict[str, float],
    ) -> Ready:
        now, aging = time.time(), self.state.settings.fleet_aging_seconds
        aged = [e for e in entries.values() if e.band < BATCH_BAND and now - e.arrived > aging]
        if aged:
            return min(aged, key=lambda e: e.arrived)
        band = min(e.band for e in entries.values())
        oldest: dict[str, Ready] = {}
        for e in sorted(entries.values(), key=lambda e: e.arrived):
            if e.band == band:
                oldest.setdefault(e.tenant, e)

        def share(e: Ready) -> tuple[float, float]:
            cost = costs.get(e.tenant, costs.get("*", DEFAULT_COST))
            return served.get(e.tenant, 0.0) + running[e.tenant] * cost, e.arrived

        return min(oldest.values(), key=share)

    async def _start_one(self, queue: str, entry: Ready) -> bool | None:
        """Start a ready job: True if it went to a worker, False if it was dropped (gone, or
        refused for its plan), None if there was no room or the broker is away."""
        redis, job_id = self.redis, entry.job_id
        member = f"{entry.tenant}/{job_id}"
        pipe = redis.pipeline(transaction=False)
        pipe.get(fleet_spec_key(job_id))
        pipe.exists(cancel_key(job_id))
        pipe.zscore(slots_key(entry.tenant), job_id)
        pipe.time()
        raw, cancelled, lease, (seconds, micros) = await pipe.execute()
        now_ms = seconds * 1000 + micros // 1000
        if raw is None or cancelled or lease is None or lease < now_ms:
            await self.withdraw_id(queue, job_id)  # its request ended, or its slot lapsed
            return False
        spec = (ImageJob if queue == SD_QUEUE else ChatJob).model_validate_json(raw)
        if entry.band < BATCH_BAND or entry.recorded:
            try:
                await self.state.quotas.check(spec.tenant_id, fresh=True)
            except PaymentRequired as refused:
                await self.withdraw_id(queue, job_id)
                await self.end_unstarted(spec, 402, refused.message)
                return False
        keys = [fleet_key(queue, part) for part in ("capacity", "running", "arrivals", "ready")]
        if not await self._start(keys=keys, args=[member, now_ms, job_id]):
            return None
        try:
            await self._send(spec, entry.recorded)
        except (KombuError, OSError) as exc:  # back in line, first: the next pass tries again
            log.warning("fleet: job %s could not be sent (%s); it waits", job_id, exc)
            await self._unstart(queue, member, entry, raw)
            return None
        await redis.delete(fleet_spec_key(job_id))
        self.state.metrics.fleet_wait.labels(entry.tier).observe(time.time() - entry.arrived)
        return True

    async def _unstart(self, queue: str, member: str, entry: Ready, raw: bytes) -> None:
        pipe = self.redis.pipeline(transaction=True)
        pipe.zrem(fleet_key(queue, "running"), member)
        pipe.zadd(fleet_key(queue, "arrivals"), {entry.job_id: int(entry.arrived * 1000)})
        pipe.hset(fleet_key(queue, "ready"), entry.job_id, json.dumps(entry.__dict__))
        await pipe.execute()

    async def end_unstarted(self, spec: ChatJob | ImageJob, status: int, message: str) -> None:
        """End a job that never started, as a worker ends one: an error chunk its reader sees,
        the signal of its end, its slot given back. Nothing ran: nothing is billed."""
        chunk = ErrorChunk(status=status, message=message)
        pipe = self.redis.pipeline(transaction=False)
        pipe.xadd(stream_key(spec.request_id), encode_chunk(chunk))
        pipe.expire(stream_key(spec.request_id), self.state.settings.stream_retention_seconds)
        pipe.rpush(done_key(spec.request_id), "1")
        pipe.expire(done_key(spec.request_id), self.state.settings.stream_retention_seconds)
        await pipe.execute()
        await self.state.admission.release(Lease(str(spec.tenant_id), spec.request_id))

    # -- what the fleet holds ------------------------------------------------------------

    async def occupancy(self) -> dict[str, tuple[int, int, Counter]]:
        """By model queue: the workers' capacity (0: unknown), the jobs running, and the jobs
        waiting by tier."""
        found = {}
        for queue in QUEUES:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(fleet_key(queue, "capacity"))
            pipe.zcard(fleet_key(queue, "running"))
            capacity, running = await pipe.execute()
            waiting = Counter(e.tier for e in (await self._ready(queue)).values())
            found[queue] = (int(capacity or 0), running, waiting)
        return found

    async def _ready(self, queue: str) -> dict[str, Ready]:
        raw = await self.redis.hgetall(fleet_key(queue, "ready"))
        return {k.decode(): Ready(**json.loads(v)) for k, v in raw.items()}

    async def _running(self, queue: str) -> Counter:
        """The jobs handed out and not ended, by tenant; the ended ones (their slot given
        back, or lapsed) leave, and what they cost is counted to their tenant."""
        key = fleet_key(queue, "running")
        members = [m.decode() for m in await self.redis.zrange(key, 0, -1)]
        if not members:
            return Counter()
        pipe = self.redis.pipeline(transaction=False)
        pipe.time()
        for member in members:
            tenant, _, job_id = member.partition("/")
            pipe.zscore(slots_key(tenant), job_id)
        (seconds, micros), *leases = await pipe.execute()
        now_ms = seconds * 1000 + micros // 1000
        live: Counter = Counter()
        ended = []
        for member, lease in zip(members, leases, strict=True):
            if lease is not None and lease >= now_ms:
                live[member.partition("/")[0]] += 1
            else:
                ended.append(member)
        if ended:
            await self.redis.zrem(key, *ended)
            await self._count_served(queue, ended)
        return live

    async def _count_served(self, queue: str, ended: list[str]) -> None:
        """Each ended job's GPU-seconds (its final chunk's), to its tenant's served seconds
        (decayed) and to what its tenant's jobs and the model's cost."""
        pipe = self.redis.pipeline(transaction=False)
        for member in ended:
            pipe.xrevrange(stream_key(member.partition("/")[2]), count=1)
        finals = await pipe.execute()
        served_key, cost_key = fleet_key(queue, "served"), fleet_key(queue, "cost")
        served = await self._served(queue)
        costs = await self._costs(queue)
        now = time.time()
        for member, last in zip(ended, finals, strict=True):
            if not last:
                continue
            seconds = float(getattr(decode_chunk(last[0][1]), "gpu_seconds", 0.0) or 0.0)
            tenant = member.partition("/")[0]
            served[tenant] = served.get(tenant, 0.0) + seconds
            for who in (tenant, "*"):
                before = costs.get(who)
                costs[who] = seconds if before is None else 0.8 * before + 0.2 * seconds
        if served:
            await self.redis.hset(served_key, mapping={t: f"{v}:{now}" for t, v in served.items()})
        if costs:
            await self.redis.hset(cost_key, mapping={t: str(v) for t, v in costs.items()})

    async def _served(self, queue: str) -> dict[str, float]:
        """Each tenant's recently served GPU-seconds, decayed to now."""
        half_life = self.state.settings.fleet_fair_half_life_seconds
        now = time.time()
        found = {}
        for tenant, raw in (await self.redis.hgetall(fleet_key(queue, "served"))).items():
            value, _, at = raw.decode().partition(":")
            found[tenant.decode()] = float(value) * 0.5 ** ((now - float(at)) / half_life)
        return found

    async def _costs(self, queue: str) -> dict[str, float]:
        raw = await self.redis.hgetall(fleet_key(queue, "cost"))
        return {k.decode(): float(v) for k, v in raw.items()}
