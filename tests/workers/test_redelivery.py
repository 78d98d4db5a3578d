"""Exactly once: a task Celery delivers twice yields one usage record and one answer."""

import json
import uuid

import pytest
from sqlalchemy import func, select

from billing.db import transaction
from billing.models import UsageRecord
from harness.helpers import record_usage, usage_rows
from harness.jobs import chat_job
from harness.processes import wait_for
from workers.contract import (
    CHAT_TASK,
    LLAVA_QUEUE,
    celery_app,
    decode_chunk,
)
from workers.keyspace import stream_key


@pytest.fixture(scope="module")
def producer(redis_url):
    app = celery_app("gpuhost-tests-producer", redis_url)
    yield app
    app.close()


def chunks(redis_client, request_id: str) -> list:
    return [decode_chunk(fields) for _, fields in redis_client.xrange(stream_key(request_id))]


def all_deliveries_acked(redis_client) -> bool:
    """Nothing queued on the llava queue, nothing of it delivered but unacknowledged (kombu's
    Redis transport keeps every queue's unacknowledged messages in one hash, each as
    [message, exchange, routing key]; other queues' are not this test's)."""
    unacked = [json.loads(raw) for raw in redis_client.hvals("unacked")]
    return redis_client.llen(LLAVA_QUEUE) == 0 and not [
        entry for entry in unacked if entry[2] == LLAVA_QUEUE
    ]


class TestDeliveredTwice:
    def test_two_deliveries_at_once_run_the_job_once(
        self, worker, producer, tenant_factory, sessions, redis_client
    ):
        tenant_id, _, key_id = tenant_factory.create("free")
        spec = chat_job("hello", 6, seed=None, tenant_id=tenant_id, key_id=key_id)
        for _ in range(2):  # the same message, twice, as a redelivery would give it
            producer.send_task(
                CHAT_TASK,
                args=[spec.model_dump(mode="json")],
                task_id=spec.request_id,
                queue=LLAVA_QUEUE,
            )
        wait_for(
            lambda: all_deliveries_acked(redis_client), 60, "both deliveries to be acknowledged"
        )
        records = usage_rows(sessions, spec.request_id)
        assert len(records) == 1 and records[0].status == "completed"
        finals = [c for c in chunks(redis_client, spec.request_id) if c.type != "token"]
        assert len(finals) == 1 and finals[0].type == "done"

    def test_a_delivery_after_the_job_finished_is_ignored(
        self, worker, producer, tenant_factory, sessions, redis_client
    ):
        tenant_id, _, key_id = tenant_factory.create("free")
        spec = chat_job("hello", 6, seed=None, tenant_id=tenant_id, key_id=key_id)
        message = dict(
            args=[spec.model_dump(mode="json")], task_id=spec.request_id, queue=LLAVA_QUEUE
        )
        producer.send_task(CHAT_TASK, **message)
        wait_for(lambda: usage_rows(sessions, spec.request_id), 60, "the first delivery to finish")
        before = len(chunks(redis_client, spec.request_id))
        producer.send_task(CHAT_TASK, **message)
        wait_for(
            lambda: all_deliveries_acked(redis_client), 60, "the second delivery to be acknowledged"
        )
        assert len(usage_rows(sessions, spec.request_id)) == 1
        assert len(chunks(redis_client, spec.request_id)) == before  # nothing streamed twice


class TestLedgerGuard:
    def test_the_unique_request_id_keeps_the_first_record(self, sessions, tenant_factory):
        tenant_id, _, _ = tenant_factory.create("free")
        request_id = uuid.uuid4().hex

        def attempt(seconds: float) -> bool:
            with transaction(sessions) as session:
                return record_usage(session, tenant_id, seconds, request_id)

        assert attempt(1.0) is True
        assert attempt(2.0) is False
        with sessions() as session:
            count = session.scalar(select(func.count()).where(UsageRecord.request_id == request_id))
            gpu = session.scalar(
                select(UsageRecord.gpu_seconds).where(UsageRecord.request_id == request_id)
            )
        assert count == 1 and gpu == 1.0
