"""The usage spool against real Redis and PostgreSQL: parked records reach the ledger once,
exactly as they were, and a record the ledger refuses stays parked instead of being dropped."""

import uuid
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime

import pytest
import redis

from billing.usage_writer import UsageWriter
from harness.helpers import usage_create, usage_rows
from tests.conftest import redis_database
from workers.keyspace import USAGE_PARKED
from workers.usage_spool import UsageSpool, _dump, _load


@pytest.fixture
def redis_client(redis_url) -> Iterator[redis.Redis]:
    """A Redis database no worker of the test stacks is running on now (the main stack's
    workers drain the parked records of theirs)."""
    client = redis.Redis.from_url(redis_url.rsplit("/", 1)[0] + f"/{redis_database(1)}")
    client.delete(USAGE_PARKED)
    yield client
    client.delete(USAGE_PARKED)


@pytest.fixture
def spool(redis_client, sessions) -> Iterator[UsageSpool]:
    spool = UsageSpool(redis_client, sessions, UsageWriter(sessions), every=3600)
    yield spool
    spool.close()


class TestUsageSpool:
    def test_a_record_reads_back_as_it_was_parked(self, tenant_factory):
        tenant_id, _, key_id = tenant_factory.create()
        usage = replace(
            usage_create(tenant_id, 1.25), api_key_id=key_id, started_at=datetime.now(UTC)
        )
        assert _load(_dump(usage).encode()) == usage

    def test_parked_records_reach_the_ledger_once(
        self, spool, redis_client, sessions, tenant_factory
    ):
        tenant_id, _, _ = tenant_factory.create()
        parked = [usage_create(tenant_id, 0.5 + i) for i in range(3)]
        for usage in parked:
            redis_client.hset(USAGE_PARKED, usage.request_id, _dump(usage))
        assert spool.parked(parked[0].request_id)
        # one of them reached the ledger before (a second drainer, a retry that did commit)
        assert spool.record(parked[0]) is True

        assert spool.drain_once() == 3
        assert redis_client.hlen(USAGE_PARKED) == 0
        for usage in parked:
            [row] = usage_rows(sessions, usage.request_id)
            assert row.gpu_seconds == usage.gpu_seconds and row.status == "completed"
        assert spool.drain_once() == 0

    def test_a_record_the_ledger_refuses_stays_parked(
        self, spool, redis_client, sessions, tenant_factory
    ):
        tenant_id, _, _ = tenant_factory.create()
        good = usage_create(tenant_id, 1.0)
        orphan = usage_create(uuid.uuid4(), 2.0)  # no such tenant: the ledger refuses it
        for usage in (good, orphan):
            redis_client.hset(USAGE_PARKED, usage.request_id, _dump(usage))

        assert spool.drain_once() == 1
        assert len(usage_rows(sessions, good.request_id)) == 1
        assert usage_rows(sessions, orphan.request_id) == []
        assert redis_client.hkeys(USAGE_PARKED) == [orphan.request_id.encode()]
