"""A worker killed mid-request: the client is told, the slot comes back, the request is
recorded once (failed, not billed) when the job is delivered again to another worker. A worker
lost before it answered: the job runs on another, and the client only waits."""

import json
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import redis

from harness.helpers import auth, chat_body, in_flight, ndjson, usage_rows
from harness.processes import Gateway, Worker, wait_for
from tests.conftest import apart
from workers.keyspace import SUBMITTED, started_key


@pytest.fixture(scope="module")
def lost_env(stack_env):
    """A stack of its own (own Redis database) with short claim and redelivery timings."""
    return apart(stack_env) | {
        "GPUHOST_CLAIM_TTL_SECONDS": "1",
        "GPUHOST_VISIBILITY_TIMEOUT_SECONDS": "2",
        "GPUHOST_RESTORE_INTERVAL_SECONDS": "0.5",
    }


@pytest.fixture(scope="module")
def lost_gateway(lost_env, tmp_path_factory):
    gateway = Gateway("gateway-lost", lost_env, tmp_path_factory.mktemp("logs"))
    try:
        gateway.wait_ready()
        yield gateway
    finally:
        gateway.stop()


def test_worker_killed_mid_request(lost_env, lost_gateway, tenant_factory, sessions, tmp_path):
    client = redis.Redis.from_url(lost_env["GPUHOST_REDIS_URL"])
    doomed = Worker("worker-doomed", lost_env, tmp_path, lost_env["GPUHOST_REDIS_URL"])
    heir = None
    try:
        doomed.wait_ready()
        tenant_id, key, _ = tenant_factory.create("free")
        body = chat_body(num_predict=4000, temperature=0)
        with httpx.stream(
            "POST", f"{lost_gateway.url}/api/chat", json=body, headers=auth(key), timeout=60
        ) as response:
            request_id = response.headers["x-request-id"]
            lines = ndjson(response)
            assert next(lines)["done"] is False
            doomed.popen.send_signal(signal.SIGKILL)
            rest = list(lines)
        assert "error" in rest[-1], rest[-1]
        assert "worker running this request was lost" in rest[-1]["error"]
        assert not any(chunk.get("done") for chunk in rest)
        wait_for(lambda: in_flight(client, tenant_id) == 0, 10, "the slot to be released")

        heir = Worker("worker-heir", lost_env, tmp_path, lost_env["GPUHOST_REDIS_URL"])
        heir.wait_ready()
        [record] = wait_for(lambda: usage_rows(sessions, request_id), 60, "the redelivered job")
        assert record.status == "failed"
        assert record.gpu_seconds == 0  # the platform's fault: not billed
        wait_for(lambda: client.hlen("unacked") == 0, 30, "the redelivery to be acknowledged")
        assert len(usage_rows(sessions, request_id)) == 1
    finally:
        doomed.stop()
        if heir is not None:
            heir.stop()


def test_worker_killed_during_an_answer_that_is_not_streamed(
    lost_env, lost_gateway, tenant_factory, tmp_path
):
    """The gateway waits for such an answer's final chunk without reading each token, and
    still notices that its worker died: 503, not billed, the slot back."""
    client = redis.Redis.from_url(lost_env["GPUHOST_REDIS_URL"])
    doomed = Worker("worker-doomed-2", lost_env, tmp_path, lost_env["GPUHOST_REDIS_URL"])
    try:
        doomed.wait_ready()
        tenant_id, key, _ = tenant_factory.create("free")
        body = chat_body(num_predict=4000, temperature=0) | {"stream": False}
        earlier = set(job_streams(client))
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                httpx.post,
                f"{lost_gateway.url}/api/chat",
                json=body,
                headers=auth(key),
                timeout=60,
            )
            wait_for(
                lambda: any(client.xlen(key) > 5 for key in set(job_streams(client)) - earlier),
                30,
                "the answer to be under way",
            )
            doomed.popen.send_signal(signal.SIGKILL)
            response = answer.result()
        assert response.status_code == 503, response.text
        assert "worker running this request was lost" in response.json()["error"]
        wait_for(lambda: in_flight(client, tenant_id) == 0, 10, "the slot to be released")
    finally:
        doomed.stop()


def job_streams(client: redis.Redis) -> list[bytes]:
    return list(client.scan_iter("gpuhost:job:*", _type="stream"))


def test_a_worker_lost_before_it_answered_is_replaced_and_the_client_gets_its_answer(
    lost_env, lost_gateway, tenant_factory, sessions, tmp_path
):
    """The job's first delivery marked it started and died before its first chunk (as a
    worker SIGKILLed while loading its batch does): the client only waits, the job runs on
    the next worker to take it, and it is answered and billed once. Set up exactly: no worker
    runs while the request waits, its `started` mark is written as the dead one left it."""
    client = redis.Redis.from_url(lost_env["GPUHOST_REDIS_URL"])
    tenant_id, key, _ = tenant_factory.create("free")
    earlier = set(client.scan_iter("gpuhost:job:*:meta"))
    heir = None
    with ThreadPoolExecutor(1) as pool:
        answer = pool.submit(
            httpx.post,
            f"{lost_gateway.url}/api/chat",
            json=chat_body(num_predict=5, temperature=0),
            headers=auth(key),
            timeout=120,
        )
        [meta] = wait_for(
            lambda: list(set(client.scan_iter("gpuhost:job:*:meta")) - earlier),
            30,
            "the request to be queued",
        )
        request_id = meta.decode().split(":")[2]
        client.set(started_key(request_id), "worker-that-died", ex=600)  # no claim, no chunk
        time.sleep(3)  # three claim TTLs: a gateway that gave up would have by now
        assert not answer.done(), answer.result().text
        try:
            heir = Worker("worker-heir-2", lost_env, tmp_path, lost_env["GPUHOST_REDIS_URL"])
            heir.wait_ready()
            response = answer.result()
        finally:
            if heir is not None:
                heir.stop()
    assert response.status_code == 200, response.text
    lines = [json.loads(line) for line in response.text.splitlines()]
    assert lines[-1]["done"] is True and lines[-1]["eval_count"] == 5
    assert response.headers["x-request-id"] == request_id
    [record] = wait_for(lambda: usage_rows(sessions, request_id), 30, "the usage record")
    assert record.status == "completed" and record.gpu_seconds > 0
    wait_for(lambda: in_flight(client, tenant_id) == 0, 10, "the slot to be released")


def test_an_async_job_whose_worker_was_lost_before_answering_keeps_its_slot_and_runs(
    lost_env, lost_gateway, tenant_factory, sessions, tmp_path
):
    """The same for an asynchronous job: while it waits to be delivered again its tenant's
    slot stays held (a Free tenant's second job waits behind it), and then it runs."""
    client = redis.Redis.from_url(lost_env["GPUHOST_REDIS_URL"])
    tenant_id, key, _ = tenant_factory.create("free")
    body = {
        "type": "chat",
        "input": {
            "model": "llava-llama3",
            "messages": [{"role": "user", "content": "Describe a lighthouse."}],
            "max_tokens": 4,
        },
    }
    made = httpx.post(f"{lost_gateway.url}/v1/jobs", json=body, headers=auth(key), timeout=30)
    assert made.status_code == 202, made.text
    job_id = made.json()["id"]
    wait_for(lambda: client.hexists(SUBMITTED, job_id), 30, "the job to be sent to the queue")
    client.set(started_key(job_id), "worker-that-died", ex=600)  # no claim, no chunk
    lease_ttl = float(lost_env["GPUHOST_LEASE_TTL_SECONDS"])
    time.sleep(lease_ttl * 1.5)  # past the lease TTL: held only if someone renews it
    assert in_flight(client, tenant_id) == 1
    second = httpx.post(f"{lost_gateway.url}/v1/jobs", json=body, headers=auth(key), timeout=30)
    assert second.status_code == 202
    heir = Worker("worker-heir-3", lost_env, tmp_path, lost_env["GPUHOST_REDIS_URL"])
    try:
        heir.wait_ready()
        for made_id in (job_id, second.json()["id"]):
            view = wait_for(
                lambda made_id=made_id: (
                    (
                        seen := httpx.get(
                            f"{lost_gateway.url}/v1/jobs/{made_id}", headers=auth(key)
                        ).json()
                    )["status"]
                    in ("succeeded", "failed")
                    and seen
                ),
                60,
                f"job {made_id} to end",
                interval=0.2,
            )
            assert view["status"] == "succeeded", view
    finally:
        heir.stop()
    [record] = usage_rows(sessions, job_id)
    assert record.status == "completed" and record.gpu_seconds > 0
    wait_for(lambda: in_flight(client, tenant_id) == 0, 10, "the slot to be released")


def test_a_gateway_gives_up_when_no_redelivery_comes_and_the_late_one_is_not_billed(
    lost_env, tenant_factory, sessions, tmp_path
):
    """The job's worker died before its first chunk and nothing delivers it again within the
    visibility timeout and the queue timeout: the client is told (503, nothing billed) and the
    slot comes back; when a worker takes the job at last, it is recorded once, cancelled and
    unbilled, and answers no one."""
    env = lost_env | {"GPUHOST_QUEUE_TIMEOUT_SECONDS": "3"}
    client = redis.Redis.from_url(env["GPUHOST_REDIS_URL"])
    tenant_id, key, _ = tenant_factory.create("free")
    (tmp_path / "gateway").mkdir()
    (tmp_path / "heir").mkdir()
    gateway = Gateway("gateway-gives-up", env, tmp_path / "gateway")
    heir = None
    try:
        gateway.wait_ready()
        earlier = set(client.scan_iter("gpuhost:job:*:meta"))
        with ThreadPoolExecutor(1) as pool:
            answer = pool.submit(
                httpx.post,
                f"{gateway.url}/api/chat",
                json=chat_body(num_predict=5) | {"stream": False},
                headers=auth(key),
                timeout=120,
            )
            [meta] = wait_for(
                lambda: list(set(client.scan_iter("gpuhost:job:*:meta")) - earlier),
                30,
                "the request to be queued",
            )
            request_id = meta.decode().split(":")[2]
            client.set(started_key(request_id), "worker-that-died", ex=600)  # no claim, no chunk
            started = time.monotonic()
            response = answer.result()
        waited = time.monotonic() - started
        assert response.status_code == 503, response.text
        assert "the worker running this request was lost" in response.json()["error"]
        assert waited >= 2 + 3 - 0.5  # the visibility timeout and the queue timeout first
        wait_for(lambda: in_flight(client, tenant_id) == 0, 10, "the slot to be released")
        assert usage_rows(sessions, request_id) == []
        heir = Worker("worker-heir-late", env, tmp_path / "heir", env["GPUHOST_REDIS_URL"])
        heir.wait_ready()
        [record] = wait_for(lambda: usage_rows(sessions, request_id), 60, "the late record")
    finally:
        if heir is not None:
            heir.stop()
        gateway.stop()
    assert record.status == "cancelled" and record.gpu_seconds == 0
