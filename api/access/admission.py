"""Per-tenant concurrency slots: a lease semaphore in Redis, shared by every gateway replica.

Each tenant has a sorted set whose members are the requests in flight, scored by the time
their lease expires (Redis server time, so gateway clocks do not matter). Taking a slot first
drops expired leases, so a crashed holder's slot comes back within the lease TTL. The gateway
renews a request's lease while it relays it, and the worker running it renews it too (so a job
whose gateway died keeps its slot until it ends: `workers.streams.Claims`); release is a ZREM,
done by both, and may be repeated. A gateway renews all the leases it holds together, in one
round trip (`LeaseKeeper`).
"""

import asyncio
import logging
import uuid
from dataclasses import dataclass

import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.errors import REDIS_AWAY, TooManyRequests, Unavailable
from workers.contract import QUEUES
from workers.fleet_keys import FLEET_WAKE, fleet_waiting_keys
from workers.keyspace import SLOT_ACQUIRE, SLOT_RELEASE, SLOT_RENEW, slots_key

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Lease:
    tenant_id: str
    holder: str
    granted_ms: int = 0  # when the slot was taken, Redis server time (ms)


class Admission:
    def __init__(
        self,
        client: aioredis.Redis,
        limits: dict[str, int],
        ttl_seconds: float,
        retry_after_seconds: int,
    ):
        self._redis = client
        self._limits = limits
        self._ttl_ms = int(ttl_seconds * 1000)
        self._retry_after = retry_after_seconds
        self._acquire = client.register_script(SLOT_ACQUIRE)
        self._renew = client.register_script(SLOT_RENEW)
        self._release = client.register_script(SLOT_RELEASE)

    def limit(self, tier: str) -> int:
        return self._limits.get(tier, 0)

    async def acquire(
        self,
        tenant_id: uuid.UUID | str,
        tier: str,
        holder: str,
        record: tuple[str, str, int] | None = None,
    ) -> Lease:
        """A slot for `holder`, or TooManyRequests. `record` (key, value, TTL in seconds) is
        written in the same step if the slot is granted, and not at all if it is refused."""
        limit = self.limit(tier)
        keys, args = [slots_key(tenant_id)], [limit, self._ttl_ms, holder]
        if record is not None:
            key, value, ttl = record
            keys.append(key)
            args += [value, ttl]
        try:
            granted, held, *at = await self._acquire(keys=keys, args=args)
        except REDIS_AWAY as exc:
            raise Unavailable(
                f"admission is unavailable (Redis: {exc}); try again shortly"
            ) from exc
        if not granted:
            raise TooManyRequests(
                f"too many requests in flight: the {tier} tier allows {limit} at a time "
                f"and {held} {'is' if held == 1 else 'are'} running; retry when one finishes",
                headers={"Retry-After": str(self._retry_after)},
            )
        return Lease(str(tenant_id), holder, at[0])

    async def renew(self, lease: Lease) -> bool:
        """Extend the lease; False if it had already expired (the slot may be someone else's)."""
        return bool(
            await self._renew(keys=[slots_key(lease.tenant_id)], args=[self._ttl_ms, lease.holder])
        )

    async def renew_all(self, leases: list[Lease]) -> list[bool]:
        """`renew` for many, in one round trip."""
        pipe = self._redis.pipeline(transaction=False)
        for lease in leases:
            await self._renew(
                keys=[slots_key(lease.tenant_id)], args=[self._ttl_ms, lease.holder], client=pipe
            )
        return [bool(renewed) for renewed in await pipe.execute()]

    async def release(self, lease: Lease) -> None:
        """Give the slot back (a no-op if it is gone); the fleet's dispatchers are woken if
        a job waits for room."""
        keys = [slots_key(lease.tenant_id), *fleet_waiting_keys(QUEUES)]
        await self._release(keys=keys, args=[lease.holder, FLEET_WAKE])

    async def in_flight(self, tenant_id: uuid.UUID | str) -> int:
        """Live leases of the tenant (expired ones not counted)."""
        return (await self.in_flight_of([tenant_id]))[0]

    async def in_flight_of(self, tenant_ids: list) -> list[int]:
        """`in_flight` for many tenants, in two round trips however many they are."""
        t = await self._redis.time()
        now_ms = t[0] * 1000 + t[1] // 1000
        pipe = self._redis.pipeline(transaction=False)
        for tenant_id in tenant_ids:
            pipe.zcount(slots_key(tenant_id), f"({now_ms}", "+inf")
        return list(await pipe.execute())


class LeaseKeeper:
    """Renews the leases of every request this gateway relays, three times per lease TTL, in
    one round trip: a slow reader keeps its slot, and a thousand open streams cost one
    pipeline, not a thousand timers."""

    def __init__(self, admission: Admission, ttl_seconds: float):
        self._admission = admission
        self._every = ttl_seconds / 3
        self._held: dict[tuple[str, str], Lease] = {}

    def hold(self, lease: Lease) -> None:
        self._held[(lease.tenant_id, lease.holder)] = lease

    def drop(self, lease: Lease) -> None:
        self._held.pop((lease.tenant_id, lease.holder), None)

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            try:
                await self.renew()
            except Exception:  # the keeper must outlive any one failure, or every lease lapses
                log.exception("renewing leases failed; trying again in %.0fs", self._every)

    async def renew(self) -> None:
        leases = list(self._held.values())
        if not leases:
            return
        try:
            renewed = await self._admission.renew_all(leases)
        except RedisError as exc:
            log.warning("could not renew %d lease(s): %s", len(leases), exc)
            return
        for lease, ok in zip(leases, renewed, strict=True):
            if not ok and (lease.tenant_id, lease.holder) in self._held:
                log.warning("the lease of %s had expired before it was renewed", lease.holder)
