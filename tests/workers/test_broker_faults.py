"""Workers on RabbitMQ (a node of the tests' own) when something under them fails: a job is
never acknowledged as done when it did not run.

- RabbitMQ delivers a dead consumer's unacknowledged jobs again at once, before the dead
  worker's claim on the job has lapsed: the new delivery waits for the claim to lapse and
  runs the job, rather than taking it for a duplicate and dropping it.
- A job delivered while Redis (claims, streams, slots) is unreachable goes back to its queue
  and runs once Redis is back, once.
"""

import signal
import time
import uuid

import pytest
import redis

from harness.helpers import usage_rows
from harness.jobs import chat_job
from harness.processes import RabbitNode, RedisServer, Worker, wait_for
from workers.contract import (
    ChatJob,
    celery_app,
    send_job,
)
from workers.keyspace import claim_key, started_key
from workers.streams import Claims

pytestmark = pytest.mark.services  # servers of its own: gpuhost dev's too, embedded

CLAIM_TTL = 2.0


@pytest.fixture(scope="module")
def rabbit(tmp_path_factory):
    node = RabbitNode(tmp_path_factory.mktemp("rabbitmq"))
    node.start()
    yield node
    node.kill()


@pytest.fixture(scope="module")
def own_redis(tmp_path_factory):
    server = RedisServer(tmp_path_factory.mktemp("redis"))
    server.start()
    yield server
    server.kill()


def rabbit_env(stack_env, rabbit, own_redis) -> dict[str, str]:
    return stack_env | {
        "GPUHOST_BROKER_URL": rabbit.url,
        "GPUHOST_REDIS_URL": own_redis.url,
        "GPUHOST_CLAIM_TTL_SECONDS": str(CLAIM_TTL),
    }


@pytest.fixture(scope="module")
def rabbit_worker(stack_env, rabbit, own_redis, tmp_path_factory):
    env = rabbit_env(stack_env, rabbit, own_redis)
    process = Worker("worker-rabbit", env, tmp_path_factory.mktemp("logs"), rabbit.url)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="module")
def producer(rabbit):
    app = celery_app("gpuhost-tests-rabbit", rabbit.url)
    yield app
    app.close()


def job(tenant_factory) -> ChatJob:
    tenant_id, _, key_id = tenant_factory.create("free")
    return chat_job("hello", 4, seed=None, tenant_id=tenant_id, key_id=key_id)


def test_a_job_redelivered_before_its_dead_workers_claim_lapsed_runs(
    stack_env, rabbit, own_redis, producer, tenant_factory, sessions, tmp_path, request
):
    spec = job(tenant_factory)
    client = redis.Redis.from_url(own_redis.url)
    env = rabbit_env(stack_env, rabbit, own_redis)
    victim = Worker("worker-victim", env, tmp_path, rabbit.url)
    try:
        victim.wait_ready()
        victim.popen.send_signal(signal.SIGSTOP)
        send_job(producer, spec)  # the only consumer is the victim: the job is in its hands
        survivor = request.getfixturevalue("rabbit_worker")
        # The victim claimed the job (a claim of a name of its own, renewed no more) and dies:
        # RabbitMQ delivers the job again at once, before the claim lapses.
        client.set(claim_key(spec.request_id), "victim:1", px=int(CLAIM_TTL * 1000))
        client.set(started_key(spec.request_id), "victim:1", ex=600)
        victim.popen.send_signal(signal.SIGKILL)
        victim.popen.wait()
    finally:
        victim.stop()
    [record] = wait_for(lambda: usage_rows(sessions, spec.request_id), 60, "the job to run")
    assert record.status == "completed" and record.gpu_seconds > 0
    assert "lost before answering; running it" in survivor.log.read_text()


def test_a_job_delivered_while_redis_is_away_runs_once_it_is_back(
    rabbit_worker, own_redis, producer, tenant_factory, sessions
):
    spec = job(tenant_factory)
    own_redis.kill()
    try:
        send_job(producer, spec)
        wait_for(
            lambda: "goes back to its queue" in rabbit_worker.log.read_text(),
            30,
            "the worker to put the job back",
        )
        time.sleep(1.5)  # delivered and put back more than once
        assert not usage_rows(sessions, spec.request_id)
    finally:
        own_redis.start()
    [record] = wait_for(lambda: usage_rows(sessions, spec.request_id), 60, "the job to run")
    assert record.status == "completed"
    time.sleep(1.0)  # any later delivery of the same job finds it recorded
    assert len(usage_rows(sessions, spec.request_id)) == 1


def test_a_claim_that_lapsed_under_its_running_job_is_set_again(redis_client):
    """A Redis restart can let a running job's claim expire between two renewals; a lapsed
    claim reads as a lost worker (the gateway gives the slot back while the job still runs).
    The worker holding the job sets it again, unless another has taken it meanwhile."""
    claims = Claims(redis_client, "worker-a:1", ttl=0.6)
    mine, taken_over = uuid.uuid4().hex, uuid.uuid4().hex
    try:
        for request_id in (mine, taken_over):
            assert claims.take(request_id, None, retention=60) is not None
            redis_client.delete(claim_key(request_id))  # lapsed
        redis_client.set(claim_key(taken_over), "worker-b:2", px=5000)
        wait_for(lambda: redis_client.get(claim_key(mine)) == b"worker-a:1", 5, "the claim back")
        time.sleep(0.5)  # renewals since: the other worker's claim is left alone
        assert redis_client.get(claim_key(taken_over)) == b"worker-b:2"
    finally:
        for request_id in (mine, taken_over):
            claims.release(request_id)
        claims.stop()
    assert not redis_client.exists(claim_key(mine))
    redis_client.delete(claim_key(taken_over), started_key(mine), started_key(taken_over))
