"""Group commits: many requests' usage records in one transaction, each caller answered only
after its record is committed, one bad record failing only its own caller."""

import threading
import uuid
from concurrent.futures import ThreadPoolExecutor

import psycopg
import pytest
from sqlalchemy import func, select, text

from billing.db import transaction
from billing.models import OutboxEvent, UsageRecord
from billing.usage import UsageCreate
from billing.usage_writer import UsageWriter, WriterClosed
from harness.helpers import usage_create


def usage_for(tenant_id, request_id=None, gpu_seconds=0.25) -> UsageCreate:
    return usage_create(tenant_id, gpu_seconds, request_id, prompt_tokens=5, output_tokens=7)


def counts(sessions, request_ids) -> tuple[int, int]:
    with sessions() as session:
        records = session.scalar(
            select(func.count())
            .select_from(UsageRecord)
            .where(UsageRecord.request_id.in_(request_ids))
        )
        outbox = session.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .join(UsageRecord, UsageRecord.id == OutboxEvent.usage_record_id)
            .where(UsageRecord.request_id.in_(request_ids))
        )
    return records, outbox


@pytest.fixture
def writer(sessions):
    writer = UsageWriter(sessions)
    yield writer
    writer.close()


def test_records_that_arrive_together_share_a_commit(sessions, tenant_factory, writer):
    tenant_id, _, _ = tenant_factory.create("pro")
    usages = [usage_for(tenant_id) for _ in range(40)]
    # Hold the tenant's row so that the first group waits on it while the others queue.
    with transaction(sessions) as blocker:
        blocker.execute(text("SELECT 1 FROM tenants WHERE id = :id FOR UPDATE"), {"id": tenant_id})
        with ThreadPoolExecutor(40) as pool:
            futures = [pool.submit(writer.record, u) for u in usages]
            threading.Event().wait(0.5)
            assert not any(f.done() for f in futures)  # nobody is answered before the commit
            blocker.commit()
            results = [f.result(timeout=30) for f in futures]
    assert results == [True] * 40
    assert counts(sessions, [u.request_id for u in usages]) == (40, 40)
    assert writer.commits < 10  # not one commit per record


def test_a_request_id_is_written_once_even_twice_in_one_group(sessions, tenant_factory, writer):
    tenant_id, _, _ = tenant_factory.create("pro")
    twin = uuid.uuid4().hex
    with ThreadPoolExecutor(4) as pool:
        results = list(pool.map(writer.record, [usage_for(tenant_id, twin) for _ in range(4)]))
    assert sorted(results) == [False, False, False, True]
    assert counts(sessions, [twin]) == (1, 1)
    assert writer.record(usage_for(tenant_id, twin)) is False  # and later, too


def test_a_bad_record_fails_its_caller_only(sessions, tenant_factory, writer):
    tenant_id, _, _ = tenant_factory.create("pro")
    good = [usage_for(tenant_id) for _ in range(5)]
    bad = usage_for(uuid.uuid4())  # no such tenant
    with ThreadPoolExecutor(6) as pool:
        futures = [pool.submit(writer.record, u) for u in [*good, bad]]
        with pytest.raises(psycopg.errors.ForeignKeyViolation):
            futures[-1].result(timeout=30)
        assert [f.result(timeout=30) for f in futures[:-1]] == [True] * 5
    assert counts(sessions, [u.request_id for u in good]) == (5, 5)
    assert counts(sessions, [bad.request_id]) == (0, 0)


def test_unbilled_records_get_no_outbox_row(sessions, tenant_factory, writer):
    tenant_id, _, _ = tenant_factory.create("pro")
    free = usage_for(tenant_id, gpu_seconds=0.0)
    assert writer.record(free) is True
    assert counts(sessions, [free.request_id]) == (1, 0)


def test_close_commits_what_is_queued_and_refuses_more(sessions, tenant_factory):
    tenant_id, _, _ = tenant_factory.create("pro")
    writer = UsageWriter(sessions)
    queued = [usage_for(tenant_id) for _ in range(3)]
    with transaction(sessions) as blocker, ThreadPoolExecutor(4) as pool:
        blocker.execute(text("SELECT 1 FROM tenants WHERE id = :id FOR UPDATE"), {"id": tenant_id})
        futures = [pool.submit(writer.record, u) for u in queued]
        threading.Event().wait(0.5)  # all three queued behind the held row
        closing = pool.submit(writer.close)
        threading.Event().wait(0.2)
        assert not closing.done()  # close waits for what is queued
        blocker.commit()
        closing.result(timeout=30)
        assert [f.result(timeout=30) for f in futures] == [True] * 3
    assert counts(sessions, [u.request_id for u in queued]) == (3, 3)
    with pytest.raises(WriterClosed):
        writer.record(usage_for(tenant_id))
