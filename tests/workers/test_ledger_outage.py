"""PostgreSQL out of a worker's reach while it answers (issue 18): the answer is delivered as
usual, ending `done: true` with what it cost, and its usage record is written exactly once
when the database is back (parked in Redis meanwhile, `workers.usage_spool`)."""

import httpx
import pytest
import redis

from harness.helpers import auth, chat_body, ndjson, usage_rows
from harness.processes import wait_for
from harness.services import database_url_through
from tests.conftest import apart, stack_apart
from workers.keyspace import USAGE_PARKED


@pytest.fixture(scope="module")
def outage_env(stack_env) -> dict[str, str]:
    """A stack of its own (its own Redis database): its jobs go to its worker only."""
    return apart(stack_env)


@pytest.fixture(scope="module")
def outage_stack(outage_env, database_url, pg_partition, tmp_path_factory):
    """A gateway that reaches PostgreSQL directly, and a worker that reaches it only through
    `pg_partition`."""
    through = database_url_through(database_url, pg_partition)
    worker_env = outage_env | {"GPUHOST_DATABASE_URL": through}
    yield from stack_apart("ledger-outage", outage_env, tmp_path_factory, worker_env)


class TestLedgerOutage:
    def test_answers_end_done_and_are_recorded_once_when_it_is_back(
        self, outage_stack, outage_env, pg_partition, tenant_factory, sessions
    ):
        gateway, _ = outage_stack
        client = redis.Redis.from_url(outage_env["GPUHOST_REDIS_URL"])
        _, key, _ = tenant_factory.create("pro")
        warm = httpx.post(
            f"{gateway.url}/api/chat",
            json={**chat_body(num_predict=3), "stream": False},
            headers=auth(key),
            timeout=60,
        )
        assert warm.status_code == 200, warm.text

        pg_partition.cut()
        try:
            whole = httpx.post(
                f"{gateway.url}/api/chat",
                json={**chat_body(num_predict=4), "stream": False},
                headers=auth(key),
                timeout=60,
            )
            assert whole.status_code == 200, whole.text
            answer = whole.json()
            assert answer["done"] is True and answer["gpu_seconds"] > 0

            with httpx.stream(
                "POST",
                f"{gateway.url}/api/chat",
                json=chat_body(num_predict=4),
                headers=auth(key),
                timeout=60,
            ) as response:
                assert response.status_code == 200
                streamed_id = response.headers["x-request-id"]
                lines = list(ndjson(response))
            assert lines[-1]["done"] is True and lines[-1]["gpu_seconds"] > 0, lines[-1]
            assert not any("error" in line for line in lines)

            ids = [whole.headers["x-request-id"], streamed_id]
            for request_id in ids:  # not in the ledger yet, but kept
                assert usage_rows(sessions, request_id) == []
                assert client.hexists(USAGE_PARKED, request_id)
        finally:
            pg_partition.restore()

        for request_id in ids:
            [record] = wait_for(
                lambda request_id=request_id: usage_rows(sessions, request_id),
                30,
                "the parked usage record to reach the ledger",
            )
            assert record.status == "completed" and record.gpu_seconds > 0
        wait_for(lambda: client.hlen(USAGE_PARKED) == 0, 10, "the spool to empty")
        for request_id in ids:
            assert len(usage_rows(sessions, request_id)) == 1
