"""The gateway's cache of tenants' quota views (api/access/quota.py), against the real ledger: one
read per tenant per TTL however many requests arrive, and never a refusal on cached figures."""

import asyncio
import uuid
from datetime import UTC, datetime

import pytest
from sqlalchemy import event, update

from api.access.quota import Quotas
from api.errors import Forbidden, PaymentRequired, Unauthorized
from billing import tenants
from billing.db import async_engine, async_session_factory, transaction
from billing.models import Tenant, UsageRecord
from config.plans import DEFAULT_PLANS
from harness.helpers import record_usage


@pytest.fixture
async def ledger(database_url):
    """Async sessions on the test database, and a count of the statements they ran."""
    engine = async_engine(database_url)
    statements = []
    event.listen(
        engine.sync_engine,
        "before_cursor_execute",
        lambda _conn, _cursor, sql, *_: statements.append(sql),
    )
    yield async_session_factory(engine), statements
    await engine.dispose()


def quota_reads(statements: list[str]) -> int:
    return sum("usage_totals" in sql for sql in statements)


def spend(sessions, tenant_id, seconds: float) -> str:
    request_id = uuid.uuid4().hex
    with transaction(sessions) as session:
        record_usage(session, tenant_id, seconds, request_id, datetime.now(UTC), 10, 5)
    return request_id


async def test_concurrent_requests_of_a_tenant_share_one_read(ledger, tenant_factory):
    sessions, statements = ledger
    quotas = Quotas(sessions, dict(DEFAULT_PLANS), ttl=60)
    tenant_id, _, _ = tenant_factory.create("pro")
    views = await asyncio.gather(*(quotas.check(tenant_id) for _ in range(20)))
    assert {v.tier for v in views} == {"pro"}
    assert quota_reads(statements) == 1
    again = await quotas.check(tenant_id)
    assert again.cached and quota_reads(statements) == 1


async def test_with_no_cache_every_check_reads_the_ledger(ledger, tenant_factory):
    sessions, statements = ledger
    quotas = Quotas(sessions, dict(DEFAULT_PLANS), ttl=0)
    tenant_id, _, _ = tenant_factory.create("pro")
    for _ in range(3):
        assert not (await quotas.check(tenant_id)).cached
    assert quota_reads(statements) == 3


async def test_a_refusal_is_decided_on_fresh_figures(ledger, tenant_factory, sessions):
    quota_sessions, statements = ledger
    quotas = Quotas(quota_sessions, dict(DEFAULT_PLANS), ttl=60)
    tenant_id, _, _ = tenant_factory.create("free")
    spent = spend(sessions, tenant_id, DEFAULT_PLANS["free"].included_gpu_seconds)
    with pytest.raises(PaymentRequired, match="GPU-seconds for this period are used up"):
        await quotas.check(tenant_id)
    # The allowance is back (a refund here; an upgrade or a new period alike): the cached
    # figures say "spent", so they are read again rather than refusing on them.
    with transaction(sessions) as session:
        session.execute(
            update(UsageRecord).where(UsageRecord.request_id == spent).values(gpu_seconds=0.0)
        )
    view = await quotas.check(tenant_id)
    assert not view.cached and view.used_gpu_seconds == 0.0
    assert quota_reads(statements) == 2


async def test_fresh_reads_the_tier_now(ledger, tenant_factory, sessions):
    quota_sessions, _ = ledger
    quotas = Quotas(quota_sessions, dict(DEFAULT_PLANS), ttl=60)
    tenant_id, _, _ = tenant_factory.create("free")
    assert (await quotas.check(tenant_id)).tier == "free"
    with transaction(sessions) as session:
        tenants.set_tier(session, str(tenant_id), "max", {"free": 1, "max": 10})
    assert (await quotas.check(tenant_id)).tier == "free"  # cached, within its TTL
    assert (await quotas.check(tenant_id, fresh=True)).tier == "max"
    assert (await quotas.check(tenant_id)).tier == "max"  # and the cache now says so


async def test_an_unknown_tenant_or_tier_is_refused(ledger, tenant_factory, sessions):
    quota_sessions, _ = ledger
    quotas = Quotas(quota_sessions, dict(DEFAULT_PLANS), ttl=60)
    ghost = uuid.uuid4()
    with pytest.raises(Unauthorized, match="tenant no longer exists"):
        await quotas.check(ghost)
    tenant_id, _, _ = tenant_factory.create("free")
    with transaction(sessions) as session:
        session.execute(update(Tenant).where(Tenant.id == tenant_id).values(tier="gold"))
    with pytest.raises(Forbidden, match="tier 'gold' has no plan"):
        await quotas.check(tenant_id)


async def test_a_tier_changed_through_this_gateway_is_read_again(ledger, tenant_factory, sessions):
    quota_sessions, _ = ledger
    quotas = Quotas(quota_sessions, dict(DEFAULT_PLANS), ttl=60)
    tenant_id, _, _ = tenant_factory.create("max")
    assert (await quotas.check(tenant_id)).tier == "max"
    with transaction(sessions) as session:  # a downgrade: the cached tier would still admit
        tenants.set_tier(session, str(tenant_id), "free", {"free": 1, "max": 10})
    quotas.forget(str(tenant_id))
    view = await quotas.check(tenant_id)
    assert view.tier == "free" and not view.cached
