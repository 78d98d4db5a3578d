"""A request whose gateway died: its worker keeps the tenant's slot while it runs. (Kills under
load, with the other faults, are `tests/chaos/test_chaos_at_scale.py`.)"""

import signal
import time

import httpx
import pytest
import redis

from harness.helpers import auth, chat_body, in_flight, usage_rows
from harness.processes import Gateway, Worker, wait_for
from tests.conftest import apart
from workers.keyspace import claim_key

LEASE_TTL = 5.0


@pytest.fixture(scope="module")
def chaos_env(stack_env):
    return apart(stack_env) | {
        "GPUHOST_LEASE_TTL_SECONDS": str(LEASE_TTL),
        "GPUHOST_CLAIM_TTL_SECONDS": "1",
        "GPUHOST_VISIBILITY_TIMEOUT_SECONDS": "2",
        "GPUHOST_RESTORE_INTERVAL_SECONDS": "0.5",
    }


def test_a_job_whose_gateway_died_keeps_its_slot_until_it_ends(
    chaos_env, tenant_factory, sessions, tmp_path
):
    """The worker renews the lease of the request it runs: a Free tenant whose gateway died
    mid-request cannot start a second one while the first still runs, and gets its slot back
    when that one ends (not a lease TTL later)."""
    env = chaos_env | {"GPUHOST_LEASE_TTL_SECONDS": "1", "GPUHOST_MAX_OUTPUT_TOKENS": "3000"}
    client = redis.Redis.from_url(env["GPUHOST_REDIS_URL"])
    doomed = Gateway("gateway-doomed", env, tmp_path)
    survivor = Gateway("gateway-survivor", env, tmp_path)
    worker = Worker("worker-long", env, tmp_path, env["GPUHOST_REDIS_URL"])
    try:
        for process in (doomed, survivor, worker):
            process.wait_ready()
        tenant_id, key = tenant_factory.create("free")[:2]
        body = chat_body(num_predict=3000, temperature=0)  # some seconds on this CPU
        with httpx.stream(
            "POST", f"{doomed.url}/api/chat", json=body, headers=auth(key), timeout=60
        ) as response:
            request_id = response.headers["x-request-id"]
            next(response.iter_lines())
            doomed.popen.send_signal(signal.SIGKILL)
        time.sleep(2)  # twice the lease TTL: only the worker keeps it now
        assert client.exists(claim_key(request_id)), "the job should still be running"
        assert in_flight(client, tenant_id) == 1
        second = httpx.post(
            f"{survivor.url}/api/chat",
            json=chat_body(num_predict=2) | {"stream": False},
            headers=auth(key),
            timeout=60,
        )
        assert second.status_code == 429  # the Free tier's one slot is the orphan's
        [record] = wait_for(lambda: usage_rows(sessions, request_id), 120, "the orphan to end")
        assert record.status == "completed"
        wait_for(lambda: in_flight(client, tenant_id) == 0, 1.5, "the slot to come back at once")
    finally:
        for process in (doomed, survivor, worker):
            process.stop()
