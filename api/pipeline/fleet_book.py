"""The fleet's records in Redis, read: the room, what runs and what waits, each job's place,
who was served how much lately (`api.pipeline.fleet`, which acts on them; the keys and the
scripts that change them: `workers.keyspace`)."""

import json
import time
from collections import Counter

import redis.asyncio as aioredis

from api.pipeline.fleet_order import DEFAULT_COST, Ready, decayed
from workers.contract import QUEUES, decode_chunk
from workers.fleet_keys import fleet_key
from workers.keyspace import slots_key, stream_key

FORGET_BELOW = 1e-3  # GPU-seconds: a tenant served less lately is no longer remembered


class Book:
    def __init__(self, redis: aioredis.Redis, settings):
        self.redis = redis
        self.settings = settings
        self._parsed: dict[str, dict[str, Ready]] = {}  # by queue: ready entries read so far

    async def position(self, queue: str, job_id: str) -> int:
        """The job's place among the ready jobs (1: next), by band, then arrival; 0 if it is
        not waiting."""
        rank = await self.redis.zrank(fleet_key(queue, "order"), job_id)
        return 0 if rank is None else rank + 1

    async def estimated_start(self, queue: str, position: int) -> float | None:
        """Seconds until a job at `position` starts, if the jobs before it cost what jobs of
        this model have lately, run as many at once as the workers take."""
        capacity = await self.redis.get(fleet_key(queue, "capacity"))
        cost = await self.redis.hget(fleet_key(queue, "cost"), "*")
        if not capacity or int(capacity) <= 0:
            return None
        return round(position * float(cost or DEFAULT_COST) / int(capacity), 1)

    async def snapshot(
        self, queue: str
    ) -> tuple[bytes | None, Counter, dict[str, Ready], dict[str, float], dict[str, float]]:
        """What a pass decides on, in two round trips: the room, the running jobs by tenant
        (those ended meanwhile counted to their tenants' served seconds), the ready jobs, the
        served seconds and the jobs' costs."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.get(fleet_key(queue, "capacity"))
        pipe.zrange(fleet_key(queue, "running"), 0, -1)
        pipe.zrange(fleet_key(queue, "order"), 0, -1)
        pipe.hgetall(fleet_key(queue, "served"))
        pipe.hgetall(fleet_key(queue, "cost"))
        pipe.time()
        capacity, members, ids, served_raw, costs_raw, (seconds, micros) = await pipe.execute()
        now_ms = seconds * 1000 + micros // 1000
        members = [m.decode() for m in members]
        half_life = self.settings.fleet_fair_half_life_seconds
        served = decayed(served_raw, half_life, time.time())
        costs = {k.decode(): float(v) for k, v in costs_raw.items()}
        ids = [i.decode() for i in ids]
        new = self._unparsed(queue, ids)
        pipe = self.redis.pipeline(transaction=False)
        for member in members:
            tenant, _, job_id = member.partition("/")
            pipe.zscore(slots_key(tenant), job_id)
        if new:
            pipe.hmget(fleet_key(queue, "ready"), new)
        found = await pipe.execute() if members or new else []
        leases = found[: len(members)]
        entries = self._entries(queue, ids, new, found[len(members)] if new else [])
        live: Counter = Counter()
        ended = []
        for member, lease in zip(members, leases, strict=True):
            if lease is not None and lease >= now_ms:
                live[member.partition("/")[0]] += 1
            else:
                ended.append(member)
        if ended:
            await self._count_served(queue, ended, served, costs)
        return capacity, live, entries, served, costs

    async def occupancy(self) -> dict[str, tuple[int, int, Counter]]:
        """By model queue: the workers' capacity (0: unknown), the jobs running, and the jobs
        waiting by tier."""
        found = {}
        for queue in QUEUES:
            pipe = self.redis.pipeline(transaction=False)
            pipe.get(fleet_key(queue, "capacity"))
            pipe.zcard(fleet_key(queue, "running"))
            capacity, running = await pipe.execute()
            waiting = Counter(e.tier for e in (await self.ready(queue)).values())
            found[queue] = (int(capacity or 0), running, waiting)
        return found

    async def ready(self, queue: str) -> dict[str, Ready]:
        """The ready jobs, by band, then arrival. An entry never changes while it is ready, so
        each is read and parsed once (`_parsed`), not on every pass."""
        ids = [i.decode() for i in await self.redis.zrange(fleet_key(queue, "order"), 0, -1)]
        new = self._unparsed(queue, ids)
        raws = await self.redis.hmget(fleet_key(queue, "ready"), new) if new else []
        return self._entries(queue, ids, new, raws)

    def _unparsed(self, queue: str, ids: list[str]) -> list[str]:
        known = self._parsed.setdefault(queue, {})
        return [i for i in ids if i not in known]

    def _entries(
        self, queue: str, ids: list[str], new: list[str], raws: list[bytes | None]
    ) -> dict[str, Ready]:
        """The ready jobs `ids` (in order), `new` ones parsed from their `raws`; the parsed
        ones kept for the next pass (only those still ready)."""
        known = self._parsed.setdefault(queue, {})
        for job_id, raw in zip(new, raws, strict=True):
            if raw is not None:
                known[job_id] = Ready(**json.loads(raw))
        self._parsed[queue] = {i: known[i] for i in ids if i in known}
        return dict(self._parsed[queue])

    async def _count_served(
        self, queue: str, ended: list[str], served: dict[str, float], costs: dict[str, float]
    ) -> None:
        """The ended jobs out of the running ones; each one's GPU-seconds (its final chunk's) to
        its tenant's served seconds (decayed) and to what its tenant's jobs and the model's
        cost (both updated in place), counted by whoever took it out (once). Tenants served
        next to nothing lately are forgotten."""
        pipe = self.redis.pipeline(transaction=False)
        for member in ended:
            pipe.zrem(fleet_key(queue, "running"), member)
            pipe.xrevrange(stream_key(member.partition("/")[2]), count=1)
        found = await pipe.execute()
        now = time.time()
        for member, taken, last in zip(ended, found[::2], found[1::2], strict=True):
            if not taken or not last:
                continue
            seconds = float(getattr(decode_chunk(last[0][1]), "gpu_seconds", 0.0) or 0.0)
            tenant = member.partition("/")[0]
            served[tenant] = served.get(tenant, 0.0) + seconds
            for who in (tenant, "*"):
                before = costs.get(who)
                costs[who] = seconds if before is None else 0.8 * before + 0.2 * seconds
        pipe = self.redis.pipeline(transaction=False)
        if forgotten := [t for t, v in served.items() if v < FORGET_BELOW]:
            pipe.hdel(fleet_key(queue, "served"), *forgotten)
            pipe.hdel(fleet_key(queue, "cost"), *forgotten)
        if kept := {t: f"{v}:{now}" for t, v in served.items() if v >= FORGET_BELOW}:
            pipe.hset(fleet_key(queue, "served"), mapping=kept)
        costs = {t: v for t, v in costs.items() if t not in forgotten}
        if costs:
            pipe.hset(fleet_key(queue, "cost"), mapping={t: str(v) for t, v in costs.items()})
        await pipe.execute()
