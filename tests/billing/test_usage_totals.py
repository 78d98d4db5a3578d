"""The monthly totals the admission check reads (usage_totals) are exactly the sums of the
usage records, however the records arrive: in batches with duplicates, across months, from
many writers at once, from before the totals existed (the migration's backfill), and when a
record is corrected or removed by hand."""

import os
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict
from datetime import UTC, datetime

import pytest
from sqlalchemy import create_engine, func, select, text, update
from sqlalchemy.orm import sessionmaker

import migrations
from billing.db import transaction
from billing.models import UsageRecord, UsageTotal
from billing.usage import UsageCreate, record_many
from harness.helpers import usage_create
from harness.services import drop_database, fresh_database

pytestmark = pytest.mark.services  # servers of its own: gpuhost dev's too, embedded

NOVEMBER = datetime(2026, 11, 30, 23, 59, 59, tzinfo=UTC)
DECEMBER = datetime(2026, 12, 1, 0, 0, 0, tzinfo=UTC)


def usage(tenant_id, finished_at, gpu_seconds, request_id=None) -> UsageCreate:
    return usage_create(tenant_id, gpu_seconds, request_id, finished_at)


def sums(session, tenants) -> dict:
    """(tenant, month) -> (GPU-seconds, records), from the records themselves."""
    month = func.date_trunc("month", UsageRecord.finished_at, "UTC")
    rows = session.execute(
        select(UsageRecord.tenant_id, month, func.sum(UsageRecord.gpu_seconds), func.count())
        .where(UsageRecord.tenant_id.in_(tenants))
        .group_by(UsageRecord.tenant_id, month)
    )
    return {(t, m): (s, n) for t, m, s, n in rows}


def totals(session, tenants) -> dict:
    rows = session.execute(
        select(
            UsageTotal.tenant_id,
            UsageTotal.period_start,
            UsageTotal.gpu_seconds,
            UsageTotal.records,
        ).where(UsageTotal.tenant_id.in_(tenants))
    )
    return {(t, m): (s, n) for t, m, s, n in rows}


def assert_totals_match(session, tenants) -> None:
    expected, kept = sums(session, tenants), totals(session, tenants)
    assert kept.keys() == expected.keys()
    for key, (seconds, records) in expected.items():
        assert kept[key][1] == records
        assert kept[key][0] == pytest.approx(seconds, rel=1e-12)


def test_batches_with_duplicates_and_two_months(sessions, tenant_factory):
    a, _, _ = tenant_factory.create("pro")
    b, _, _ = tenant_factory.create("free")
    repeated = uuid.uuid4().hex
    with transaction(sessions) as session:
        written = record_many(
            session,
            [
                usage(a, NOVEMBER, 1.5, repeated),
                usage(a, NOVEMBER, 9.0, repeated),  # the same request again: not counted
                usage(a, DECEMBER, 0.25),
                usage(b, NOVEMBER, 2.0),
                usage(b, NOVEMBER, 0.0),  # counted as a record, zero seconds
            ],
        )
    assert written == [True, False, True, True, True]
    with transaction(sessions) as session:
        record_many(session, [usage(a, NOVEMBER, 3.0), usage(a, NOVEMBER, 7.0, repeated)])
    with sessions() as session:
        assert_totals_match(session, [a, b])
        kept = totals(session, [a, b])
    november = datetime(2026, 11, 1, tzinfo=UTC)
    assert kept[(a, november)] == (4.5, 2)
    assert kept[(a, datetime(2026, 12, 1, tzinfo=UTC))] == (0.25, 1)
    assert kept[(b, november)] == (2.0, 2)


def test_a_failed_transaction_adds_nothing(sessions, tenant_factory):
    a, _, _ = tenant_factory.create("pro")
    with pytest.raises(RuntimeError), transaction(sessions) as session:
        record_many(session, [usage(a, NOVEMBER, 5.0)])
        raise RuntimeError("rolled back after the records went in")
    with sessions() as session:
        assert totals(session, [a]) == {}


def test_many_writers_at_once_over_the_same_tenants(sessions, tenant_factory):
    """Writers whose batches touch the same tenants in different orders: no deadlock (the
    trigger locks totals in one order), no lost update."""
    tenants = [tenant_factory.create("max")[0] for _ in range(4)]

    def write(i: int) -> None:
        order = tenants[i % 4 :] + tenants[: i % 4]
        batch = [
            usage(t, NOVEMBER if j % 2 else DECEMBER, 0.125 * (j + 1))
            for j, t in enumerate(order * 3)
        ]
        with transaction(sessions) as session:
            record_many(session, batch)

    with ThreadPoolExecutor(8) as pool:
        list(pool.map(write, range(40)))
    with sessions() as session:
        assert_totals_match(session, tenants)
        assert sum(n for _, n in totals(session, tenants).values()) == 40 * 12


def test_a_record_corrected_or_removed_by_hand_moves_the_totals(sessions, tenant_factory):
    a, _, _ = tenant_factory.create("pro")
    moved, dropped = uuid.uuid4().hex, uuid.uuid4().hex
    with transaction(sessions) as session:
        record_many(
            session,
            [
                usage(a, DECEMBER, 3.0, moved),
                usage(a, DECEMBER, 1.0),
                usage(a, DECEMBER, 0.0, dropped),
            ],
        )
    with transaction(sessions) as session:
        session.execute(
            update(UsageRecord)
            .where(UsageRecord.request_id == moved)
            .values(finished_at=NOVEMBER, gpu_seconds=2.5)
        )
        session.execute(UsageRecord.__table__.delete().where(UsageRecord.request_id == dropped))
    with sessions() as session:
        assert_totals_match(session, [a])
        kept = totals(session, [a])
    assert kept[(a, datetime(2026, 11, 1, tzinfo=UTC))] == (2.5, 1)
    assert kept[(a, datetime(2026, 12, 1, tzinfo=UTC))] == (1.0, 1)


@pytest.fixture
def scratch_url():
    name = f"gpuhost_test_totals_{os.getpid()}"
    yield fresh_database(name)
    drop_database(name)


# A usage record as revision 0009's schema holds it (today's writer has columns it lacks).
RECORD_AT_0009 = text(
    "INSERT INTO usage_records (id, request_id, tenant_id, api_key_id, model, kind, status,"
    " gpu_seconds, queue_seconds, prompt_tokens, output_tokens, started_at, finished_at)"
    " VALUES (:id, :request_id, :tenant_id, :api_key_id, :model, :kind, :status, :gpu_seconds,"
    " :queue_seconds, :prompt_tokens, :output_tokens, :started_at, :finished_at)"
)


def test_the_migration_counts_the_records_written_before_it(scratch_url):
    migrations.upgrade(scratch_url, "0009")
    engine = create_engine(scratch_url)
    try:
        tenant = uuid.uuid4()
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO tenants (id, name, tier) VALUES (:id, 'before', 'pro')"),
                {"id": tenant},
            )
        with engine.begin() as connection:  # as the writer of that revision wrote them
            for earlier in (usage(tenant, NOVEMBER, 1.0), usage(tenant, DECEMBER, 2.0)):
                connection.execute(RECORD_AT_0009, {"id": uuid.uuid4()} | asdict(earlier))
        migrations.upgrade(scratch_url)
        with transaction(sessionmaker(engine)) as session:
            record_many(session, [usage(tenant, NOVEMBER, 4.0)])
        with sessionmaker(engine)() as session:
            assert_totals_match(session, [tenant])
            assert totals(session, [tenant])[(tenant, datetime(2026, 11, 1, tzinfo=UTC))] == (
                5.0,
                2,
            )
    finally:
        engine.dispose()
