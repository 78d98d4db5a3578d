"""What admission needs from the ledger: a tenant's tier and the GPU-seconds it used this
billing period, read at most once per `ttl` seconds per tenant by each gateway.

Reading them from PostgreSQL on every request cost about a third of the gateway's time on
its hot path (bench/gateway.py); the GPU-seconds are one row (a monthly total the database
keeps beside the records, migration 0010), no longer a sum over the month's records. A cached
view may admit a request; a refusal (402 here, 429 at admission) is only ever given on a fresh one,
so a tenant that upgraded or whose period rolled over is never refused on old figures. What
the cache costs: a downgrade applies within `ttl`, and a tenant on a plan without overage
can spend past its allowance by what it runs in `ttl` (at most its tier's requests in flight).
Concurrent requests of a tenant whose view is stale wait for one read, not one each.
"""

import asyncio
import time
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from cachetools import TTLCache
from sqlalchemy.ext.asyncio import async_sessionmaker

from api.errors import Forbidden, PaymentRequired, Unauthorized, Unavailable
from billing import usage
from billing.db import database_away
from billing.plans import Balance, Period, period_of
from config.plans import Plan


@dataclass(frozen=True)
class View:
    tier: str
    used_gpu_seconds: float
    period: Period
    cached: bool  # served from this gateway's cache rather than read just now
    stale: bool = False  # the ledger is away: the last figures read, within the outage grace


class Quotas:
    def __init__(
        self,
        sessions: async_sessionmaker,
        plans: dict[str, Plan],
        ttl: float,
        grace: float = 60.0,
    ):
        """`ttl`: how long figures are served from the cache; `grace`: how long the last
        figures read stand in while the ledger is away (then 503)."""
        self._sessions = sessions
        self._plans = plans
        self._views: TTLCache[uuid.UUID, View] = TTLCache(
            maxsize=100_000, ttl=max(ttl, 1e-9), timer=time.monotonic
        )
        self._last_read: TTLCache[uuid.UUID, View] = TTLCache(
            maxsize=100_000, ttl=max(grace, 1e-9), timer=time.monotonic
        )
        self._enabled = ttl > 0
        self._reading: dict[uuid.UUID, asyncio.Future[View]] = {}

    async def check(self, tenant_id: uuid.UUID, fresh: bool = False) -> View:
        """The tenant's view, after checking that its plan still covers another request this
        period (HTTP 402 if not; 401 if the tenant is gone, 403 if its tier has no plan)."""
        view = await self.view(tenant_id, fresh)
        plan = self._plans.get(view.tier)
        if plan is None:
            raise Forbidden(f"tier '{view.tier}' has no plan on this server")
        if Balance(plan, view.period, view.used_gpu_seconds).exhausted:
            if view.stale:
                raise Unavailable(
                    "the ledger is unavailable and this tenant's allowance cannot be "
                    "confirmed; try again shortly"
                )
            if view.cached:
                return await self.check(tenant_id, fresh=True)
            raise PaymentRequired(
                f"the {plan.name} plan's {plan.included_gpu_seconds:g} GPU-seconds for this "
                f"period are used up; they renew at {view.period.end.isoformat()} "
                "(or upgrade your plan)"
            )
        return view

    def forget(self, tenant_id: uuid.UUID | str) -> None:
        """Drop the tenant's cached view (its tier changed through this gateway)."""
        self._views.pop(uuid.UUID(str(tenant_id)), None)
        self._last_read.pop(uuid.UUID(str(tenant_id)), None)

    async def view(self, tenant_id: uuid.UUID, fresh: bool = False) -> View:
        period = period_of(datetime.now(UTC))
        if self._enabled and not fresh:
            cached = self._views.get(tenant_id)
            if cached is not None and cached.period == period:
                return cached
        reading = self._reading.get(tenant_id)
        if reading is None or fresh:
            reading = asyncio.ensure_future(self._read(tenant_id, period))
            self._reading[tenant_id] = reading
            reading.add_done_callback(lambda done: self._read_ended(tenant_id, done))
        # shielded: a caller that is cancelled does not cancel the read the others wait for
        return await asyncio.shield(reading)

    def _read_ended(self, tenant_id: uuid.UUID, done: asyncio.Future) -> None:
        if self._reading.get(tenant_id) is done:
            del self._reading[tenant_id]
        if not done.cancelled():
            done.exception()  # retrieved here too, in case every waiter was cancelled

    async def _read(self, tenant_id: uuid.UUID, period: Period) -> View:
        try:
            async with self._sessions() as session:
                found = await usage.admission_view(session, tenant_id, period)
        except Exception as exc:
            if not database_away(exc):
                raise
            last = self._last_read.get(tenant_id)
            if last is None or last.period != period:
                raise Unavailable("the ledger is unavailable; try again shortly") from exc
            return replace(last, cached=True, stale=True)
        if found is None:
            self._views.pop(tenant_id, None)
            self._last_read.pop(tenant_id, None)
            raise Unauthorized("this key's tenant no longer exists")
        tier, used = found
        if self._enabled:
            self._views[tenant_id] = View(tier, used, period, cached=True)
        self._last_read[tenant_id] = View(tier, used, period, cached=False)
        return View(tier, used, period, cached=False)
