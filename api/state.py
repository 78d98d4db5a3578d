"""The gateway's state: made by the lifespan, one per process, never a module global."""

import asyncio
import uuid
from collections.abc import AsyncIterator, Coroutine
from contextlib import asynccontextmanager
from dataclasses import dataclass, field

import redis.asyncio as aioredis
from cachetools import TTLCache
from celery import Celery
from fastapi import FastAPI
from sqlalchemy.ext.asyncio import AsyncEngine, async_sessionmaker

from api.access.admission import Admission, LeaseKeeper
from api.access.quota import Quotas
from api.guards.throttle import CredentialThrottle
from api.inputs.image_checks import Decoder
from api.operator.metrics import GatewayMetrics
from api.pipeline.fleet import Fleet
from api.settings import GatewaySettings
from billing.db import async_engine, async_session_factory
from billing.tenants import KeyOwner
from storage import Storage
from workers.contract import celery_app


@dataclass
class AppState:
    settings: GatewaySettings
    redis: aioredis.Redis
    db: AsyncEngine
    sessions: async_sessionmaker
    admission: Admission
    leases: LeaseKeeper
    celery: Celery
    key_cache: TTLCache[str, KeyOwner]  # looked up within auth_cache_seconds
    known_keys: TTLCache[str, KeyOwner]  # looked up within the ledger outage grace
    quotas: Quotas
    metrics: GatewayMetrics
    storage: Storage
    decoder: Decoder
    throttle: CredentialThrottle
    fleet: "Fleet" = None  # type: ignore[assignment]  # made with the state (it reads it)
    tasks: set[asyncio.Task] = field(default_factory=set)
    # Bumped by every key dropped from the caches: a lookup that began before a revocation
    # is not cached (api/deps.py), so that it cannot put the revoked key back.
    key_generation: int = 0
    # Set while this gateway follows the revocation channel (api/access/revocations.py; /readyz)
    following_revocations: asyncio.Event = field(default_factory=asyncio.Event)

    def spawn(self, work: Coroutine) -> None:
        """Run `work` in the background, owned by the app (ended at shutdown)."""
        task = asyncio.create_task(work)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    def forget_key(self, key_id: uuid.UUID | str) -> None:
        """Drop a revoked key from this gateway's caches (api/access/revocations.py); other
        keys stay cached."""
        key_id = key_id if isinstance(key_id, uuid.UUID) else uuid.UUID(key_id)
        self.key_generation += 1
        for cache in (self.key_cache, self.known_keys):
            for cached in [k for k, owner in list(cache.items()) if owner.key_id == key_id]:
                cache.pop(cached, None)

    def forget_all_keys(self) -> None:
        self.key_generation += 1
        self.key_cache.clear()
        self.known_keys.clear()

    def serves(self, model: str) -> bool:
        return model in self.model_names()

    def model_names(self) -> list[str]:
        name = self.settings.llava_model
        return [name, f"{name}:latest"]


def lifespan(settings: GatewaySettings, metrics: GatewayMetrics, background=()):
    """The app's state for its lifetime; `background`: functions of the state that return
    coroutines to run until shutdown (the job scheduler)."""

    @asynccontextmanager
    async def run(_: FastAPI) -> AsyncIterator[dict]:
        client = aioredis.Redis.from_url(settings.redis_url)
        db = async_engine(settings.database_url, settings.db_pool_size)
        sessions = async_session_factory(db)
        admission = Admission(
            client, settings.tier_limits, settings.lease_ttl_seconds, settings.retry_after_seconds
        )
        grace = max(settings.ledger_outage_grace_seconds, 1e-9)
        celery = celery_app("gpuhost-gateway", **settings.celery())
        state = AppState(
            settings=settings,
            redis=client,
            db=db,
            sessions=sessions,
            admission=admission,
            leases=LeaseKeeper(admission, settings.lease_ttl_seconds),
            celery=celery,
            key_cache=TTLCache(maxsize=100_000, ttl=settings.auth_cache_seconds),
            known_keys=TTLCache(maxsize=100_000, ttl=grace),
            quotas=Quotas(sessions, settings.plans, settings.quota_cache_seconds, grace),
            metrics=metrics,
            storage=Storage(settings.storage_url),
            decoder=Decoder(
                settings.image_check_threads, settings.tier_limits, metrics.image_checks
            ),
            throttle=CredentialThrottle(
                client,
                settings.credential_failures_limit,
                settings.credential_failures_window_seconds,
            ),
        )
        state.fleet = Fleet(state)
        state.spawn(state.leases.run())
        for work in background:
            state.spawn(work(state))
        try:
            yield {"gpuhost": state}
        finally:
            for task in list(state.tasks):  # abandoned jobs: cancelled, their slots freed
                task.cancel()
            await asyncio.gather(*state.tasks, return_exceptions=True)
            await client.aclose()
            await db.dispose()
            celery.close()

    return run
