"""Wait, don't refuse: a synchronous request over its tenant's tier waits in the tenant's queue
for a slot (GPUHOST_ADMISSION_WAIT_SECONDS), never running past the tier, and leaves the
queue when it times out or its client goes away."""

import asyncio
import contextlib
import threading
import time
import uuid

import httpx
import ollama
import pytest
import redis.asyncio as aioredis

from api.pipeline import store
from api.pipeline.store import JobMeta
from harness.helpers import (
    auth,
    chat_body,
    free_slot,
    hold_slot,
    in_flight,
    samples,
    usage_rows,
    value,
)
from harness.processes import wait_for
from tests.conftest import running_gateway
from workers.keyspace import (
    IN_HAND,
    TAKING,
    TENANTS_WAITING,
    job_record_key,
    waiting_key,
)

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def waiting_gateway(stack_env, tmp_path_factory):
    """Requests over the tier wait up to a minute (the default is 30 s)."""
    env = stack_env | {"GPUHOST_ADMISSION_WAIT_SECONDS": "60"}
    yield from running_gateway("gateway-waits", env, tmp_path_factory)


@pytest.fixture(scope="module")
def impatient_gateway(stack_env, tmp_path_factory):
    """Requests wait a second at most."""
    env = stack_env | {"GPUHOST_ADMISSION_WAIT_SECONDS": "1"}
    yield from running_gateway("gateway-impatient", env, tmp_path_factory)


@pytest.fixture(scope="module")
def short_queue_gateway(stack_env, tmp_path_factory):
    """Requests wait up to a minute, and at most two wait per tenant."""
    env = stack_env | {
        "GPUHOST_ADMISSION_WAIT_SECONDS": "60",
        "GPUHOST_ADMISSION_QUEUE_LENGTH": "2",
    }
    yield from running_gateway("gateway-short-queue", env, tmp_path_factory)


class Peak:
    """The most slots the tenant held at once, sampled from Redis while it runs."""

    def __init__(self, redis_client, tenant_id):
        self.redis, self.tenant, self.most = redis_client, tenant_id, 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self):
        while not self._stop.is_set():
            self.most = max(self.most, in_flight(self.redis, self.tenant))
            time.sleep(0.005)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()


def scheduler_passes(gateway) -> float:
    return value(samples(f"{gateway.url}/metrics"), "gpuhost_scheduler_passes_total")


def chat_once(gateway, key: str) -> httpx.Response:
    body = chat_body(num_predict=2) | {"stream": False}
    return httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60)


def test_twenty_requests_on_a_free_key_all_answered_one_at_a_time(
    waiting_gateway, tenant_factory, sessions, redis_client
):
    tenant_id, key, _ = tenant_factory.create("free")
    other_id, other_key, _ = tenant_factory.create("free")
    finished = []

    async def ask(client: httpx.AsyncClient, who: str, api_key: str) -> dict:
        response = await client.post(
            f"{waiting_gateway.url}/api/chat",
            json=chat_body(num_predict=3) | {"stream": False},
            headers=auth(api_key),
        )
        assert response.status_code == 200, response.text
        finished.append(who)
        return response.json() | {"request_id": response.headers["x-request-id"]}

    async def other_tenant(client: httpx.AsyncClient) -> list[dict]:
        while redis_client.llen(waiting_key(str(tenant_id))) < 10:  # the first's queue is long
            await asyncio.sleep(0.01)
        return [await ask(client, "other", other_key) for _ in range(2)]

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            return await asyncio.gather(
                asyncio.gather(*(ask(client, "first", key) for _ in range(20))),
                other_tenant(client),
            )

    with Peak(redis_client, tenant_id) as first_peak, Peak(redis_client, other_id) as other_peak:
        answers, others = asyncio.run(run())
    assert len(answers) == 20 and all(a["done"] for a in answers)
    assert first_peak.most == 1 and other_peak.most == 1  # never above the Free tier
    # the other tenant was not starved: both its requests ended while the first still waited
    last_other = max(i for i, who in enumerate(finished) if who == "other")
    assert finished[last_other + 1 :].count("first") >= 5, finished
    # waiting is reported, never billed
    longest = max(answers, key=lambda a: a["queue_duration"])  # nanoseconds, as Ollama's
    waited = longest["queue_duration"] / 1e9
    assert waited > 5 * longest["gpu_seconds"]
    (record,) = usage_rows(sessions, longest["request_id"])
    assert record.queue_seconds == pytest.approx(waited, abs=1e-3)
    assert record.gpu_seconds == pytest.approx(longest["gpu_seconds"], abs=1e-6)
    assert redis_client.llen(waiting_key(str(tenant_id))) == 0
    assert in_flight(redis_client, tenant_id) == 0


def test_the_official_ollama_client_gets_all_five_answers_on_a_pro_key(
    waiting_gateway, tenant_factory
):
    """The client does not retry a 429: with 5 requests and 3 slots, two would fail."""
    _, key, _ = tenant_factory.create("pro")
    client = ollama.AsyncClient(host=waiting_gateway.url, headers=auth(key))

    async def run():
        return await asyncio.gather(
            *(
                client.chat(
                    model="llava-llama3",
                    messages=[{"role": "user", "content": f"question {n}"}],
                    options={"num_predict": 3, "seed": n},
                )
                for n in range(5)
            )
        )

    answers = asyncio.run(run())
    assert [a.done for a in answers] == [True] * 5


def test_a_request_that_waits_too_long_gets_429_and_leaves_nothing(
    impatient_gateway, tenant_factory, redis_client
):
    tenant_id, key, _ = tenant_factory.create("free")
    holder = hold_slot(redis_client, tenant_id)
    try:
        started = time.monotonic()
        refused = chat_once(impatient_gateway, key)
        assert refused.status_code == 429
        assert time.monotonic() - started >= 1  # it waited before it was refused
        assert refused.headers["retry-after"] == "1"
        assert "none came free within 1 s of waiting" in refused.json()["error"]
        assert redis_client.llen(waiting_key(str(tenant_id))) == 0
        assert in_flight(redis_client, tenant_id) == 1  # ours alone
    finally:
        free_slot(redis_client, tenant_id, holder)
    assert chat_once(impatient_gateway, key).status_code == 200


def test_a_full_queue_refuses_at_once(short_queue_gateway, tenant_factory, redis_client):
    """Two wait (the queue's length), the third is refused at once; once the slot is free,
    the two that waited are answered in turn."""
    tenant_id, key, _ = tenant_factory.create("free")
    holder = hold_slot(redis_client, tenant_id)
    url = f"{short_queue_gateway.url}/api/chat"
    body = chat_body(num_predict=2) | {"stream": False}

    async def run():
        async with httpx.AsyncClient(timeout=120) as client:
            waiting = [asyncio.create_task(client.post(url, json=body, headers=auth(key)))]
            waiting.append(asyncio.create_task(client.post(url, json=body, headers=auth(key))))
            while redis_client.llen(waiting_key(str(tenant_id))) < 2:
                await asyncio.sleep(0.01)
            third = await client.post(url, json=body, headers=auth(key))
            free_slot(redis_client, tenant_id, holder)
            return third, await asyncio.gather(*waiting)

    try:
        third, waited = asyncio.run(run())
    finally:
        free_slot(redis_client, tenant_id, holder)
    assert third.status_code == 429, third.text
    assert "2 already wait in line" in third.json()["error"]
    assert [r.status_code for r in waited] == [200, 200], [r.text for r in waited]


def test_a_client_that_leaves_while_waiting_leaves_the_queue(
    waiting_gateway, tenant_factory, redis_client
):
    tenant_id, key, _ = tenant_factory.create("free")
    holder = hold_slot(redis_client, tenant_id)
    queue = waiting_key(str(tenant_id))

    async def leave_while_waiting():
        async with httpx.AsyncClient(timeout=30) as client:
            request = asyncio.create_task(
                client.post(
                    f"{waiting_gateway.url}/api/chat",
                    json=chat_body(num_predict=2),
                    headers=auth(key),
                )
            )
            # (the schedulers take it off the queue and put it back, no slot being free)
            while (waiter := redis_client.lindex(queue, 0)) is None:
                await asyncio.sleep(0.01)
            request.cancel()  # the connection closes
            return waiter.decode()

    try:
        waiter = asyncio.run(leave_while_waiting())
        # (an empty queue alone can be a scheduler's moment between taking and putting back)
        record = job_record_key(waiter)
        wait_for(
            lambda: redis_client.llen(queue) == 0 and not redis_client.exists(record),
            10,
            "the waiter to leave the queue, its record gone",
        )
    finally:
        passes = scheduler_passes(waiting_gateway)
        free_slot(redis_client, tenant_id, holder)
    wait_for(  # two passes of its scheduler since: the freed slot is granted to nobody
        lambda: scheduler_passes(waiting_gateway) >= passes + 2,
        30,
        "two scheduler passes",
        interval=0.05,
    )
    assert in_flight(redis_client, tenant_id) == 0
    assert redis_client.llen(queue) == 0 and not redis_client.exists(record)


@contextlib.asynccontextmanager
async def scheduling_alone(redis_url: str):
    """A Redis client for a test that plays a gateway's scheduler: it holds the schedulers'
    TAKING lock, so the running gateways' own schedulers stay off until the block ends."""
    redis = aioredis.Redis.from_url(redis_url)
    try:
        async with redis.lock(TAKING, timeout=10):
            yield redis
    finally:
        await redis.aclose()


def test_a_request_put_back_is_not_lost_when_another_scheduler_found_its_queue_empty(
    redis_url, redis_client
):
    """Two gateways' schedulers: one takes a tenant's last waiting request and finds no slot
    free; meanwhile the other finds the queue empty. The request put back is still taken next,
    not left to time out (CI saw one of twenty wait its whole minute)."""
    tenant, job_id = f"tenant-{uuid.uuid4().hex}", uuid.uuid4().hex
    meta = JobMeta(tenant, "ollama-chat", "llava-llama3", time.time())

    async def run():
        async with scheduling_alone(redis_url) as redis:  # the test plays both schedulers
            await store.add_waiter(redis, job_id, "free", meta, ttl=60)
            first = await store.next_waiting(redis)  # scheduler A takes it: no slot is free
            second = await store.next_waiting(redis)  # scheduler B: the queue is empty
            await store.requeue(redis, tenant, job_id)  # A puts it back
            third = await store.next_waiting(redis)
            await store.next_waiting(redis)  # empty again: the tenant leaves the set
            await redis.delete(job_record_key(job_id))
        return first, second, third

    first, second, third = asyncio.run(run())
    assert (tenant, job_id) in first
    assert tenant not in {t for t, _ in second}
    assert (tenant, job_id) in third
    assert not redis_client.sismember(TENANTS_WAITING, tenant)


def test_a_slot_granted_after_its_request_left_makes_no_record(redis_url, redis_client):
    """A scheduler that took a slot for a request which left meanwhile (its gateway deleted
    its record) is told so, and leaves nothing behind to outlive it: no record, no place in
    line."""
    tenant, job_id = f"tenant-{uuid.uuid4().hex}", uuid.uuid4().hex
    meta = JobMeta(tenant, "ollama-chat", "llava-llama3", time.time())

    async def run():
        async with scheduling_alone(redis_url) as redis:
            await store.add_waiter(redis, job_id, "free", meta, ttl=60)
            [taken] = [t for t in await store.next_waiting(redis) if t[0] == tenant]
            await redis.delete(job_record_key(job_id))  # the request left (queue_wait._leave)
            granted = await store.grant(redis, job_id, 123)
            await store.requeue(redis, tenant, job_id)  # nor is it put back in line
            await store.next_waiting(redis)  # its queue is empty: the tenant leaves the set
        return taken, granted

    taken, granted = asyncio.run(run())
    assert taken == (tenant, job_id) and granted is False
    assert not redis_client.exists(job_record_key(job_id))
    assert redis_client.llen(waiting_key(tenant)) == 0
    assert not redis_client.sismember(TENANTS_WAITING, tenant)


def test_jobs_a_scheduler_took_and_never_placed_go_back_in_line(redis_url, redis_client):
    """A scheduler takes jobs off their queues, then Redis fails under it (restarting) or it
    dies before it places them: the next scheduler to take jobs puts each back first in line,
    the one marked submitted but never sent too. (The chaos run saw such an async job, taken by
    a gateway SIGKILLed a moment later, never run.)"""
    tenant = f"tenant-{uuid.uuid4().hex}"
    waiting_job, marked_job = uuid.uuid4().hex, uuid.uuid4().hex
    record = {"tenant_id": tenant, "tier": "pro", "type": "chat", "model": "llava-llama3"}

    async def run():
        async with scheduling_alone(redis_url) as redis:
            for job_id in (waiting_job, marked_job):
                await store.add_waiting_job(redis, job_id, record, 60, False, time.time())
            for _ in range(2):  # taken, one a round; then the scheduler is gone
                await store.next_waiting(redis)
            await store.move_job(redis, marked_job, store.WAITING, store.SUBMITTED_STATE)
            in_hand = await redis.hmget(IN_HAND, [waiting_job, marked_job])
            put_back = await store.put_back_in_hand(redis)
            left = await redis.hmget(IN_HAND, [waiting_job, marked_job])
            queued = [raw.decode() for raw in await redis.lrange(waiting_key(tenant), 0, -1)]
            states = [await redis.hget(job_record_key(j), "state") for j in queued]
            for job_id in (waiting_job, marked_job):
                await redis.delete(job_record_key(job_id))
            await redis.delete(waiting_key(tenant))
            await redis.srem(TENANTS_WAITING, tenant)
        return in_hand, put_back, left, queued, states

    in_hand, put_back, left, queued, states = asyncio.run(run())
    assert in_hand == [tenant.encode()] * 2 and put_back >= 2
    assert left == [None, None]
    assert sorted(queued) == sorted([waiting_job, marked_job])
    assert states == [store.WAITING.encode()] * 2
