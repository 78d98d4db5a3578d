"""The fleet (api/pipeline/fleet.py): which admitted job a worker runs next when the workers
are busy. The order itself first (bands, the aging bound, fair share by GPU-seconds served);
then through a gateway and a worker: a Max tenant's job goes before Free jobs that waited
longer, nothing is handed to the broker beyond the workers' room, a job whose plan no longer
covers it when it would start ends with 402, unbilled."""

import json
import threading
import time
import uuid
from collections import Counter

import httpx
import psutil
import pytest

from api.pipeline.fleet_order import BATCH_BAND, Ready, next_job, open_to, reserve
from billing import tenants
from billing.db import transaction
from config.plans import DEFAULT_PLANS
from harness.helpers import auth, chat_body, free_slot, hold_slot, record_usage, usage_rows
from harness.processes import wait_for
from harness.services import TIERS
from tests.conftest import running_gateway
from workers.fleet_keys import fleet_key
from workers.keyspace import (
    IN_HAND,
    WAITING_COUNT,
    job_record_key,
    slots_key,
    started_key,
    waiting_key,
)


def choose(waiting: dict, running=None, served=None, costs=None, aging: float = 30.0):
    """The job the fleet's order starts next."""
    return next_job(waiting, running or Counter(), served or {}, costs or {}, time.time(), aging)


def room(waiting: dict, capacity: bytes | None, running: int, reserved: int, plans=DEFAULT_PLANS):
    """The ready jobs the room left has space for, `reserved` slots kept for paying plans."""
    return open_to(waiting, capacity, running, lambda band: reserve(plans, reserved, band))


def ready(tenant: str, band: int, waited: float, job: str | None = None) -> Ready:
    return Ready(job or uuid.uuid4().hex, tenant, "x", band, time.time() - waited, False)


def entries(*made: Ready) -> dict[str, Ready]:
    return {entry.job_id: entry for entry in made}


class TestOrder:
    def test_a_lower_band_goes_first_whatever_came_before(self):
        waiting = entries(ready("free", 2, waited=5), ready("pro", 1, 3), ready("max", 0, 1))
        assert choose(waiting).tenant == "max"

    def test_batch_lines_go_after_every_band(self):
        waiting = entries(ready("batch", BATCH_BAND, waited=20), ready("free", 2, 1))
        assert choose(waiting).tenant == "free"

    def test_within_a_band_the_tenant_served_least_goes_first(self):
        waiting = entries(ready("a", 2, waited=5), ready("b", 2, waited=1))
        served = {"a": 10.0, "b": 2.0}
        assert choose(waiting, served=served).tenant == "b"

    def test_running_jobs_count_at_what_their_tenants_jobs_cost(self):
        """b was served less, but runs three jobs of 5 GPU-seconds each now."""
        waiting = entries(ready("a", 2, waited=1), ready("b", 2, waited=5))
        served, costs = {"a": 10.0, "b": 2.0}, {"a": 1.0, "b": 5.0}
        assert choose(waiting, Counter(b=3), served, costs).tenant == "a"

    def test_a_tenants_own_jobs_go_in_their_order(self):
        older, newer = ready("a", 2, waited=5), ready("a", 2, waited=1)
        assert choose(entries(newer, older)) == older

    def test_past_the_aging_bound_the_oldest_goes_first_whatever_its_band(self):
        starved = ready("free", 2, waited=31)
        waiting = entries(ready("max", 0, waited=1), starved)
        assert choose(waiting, aging=30) == starved
        assert choose(waiting, aging=60).tenant == "max"

    def test_a_batch_line_is_never_aged_ahead(self):
        waiting = entries(ready("batch", BATCH_BAND, waited=999), ready("free", 2, 1))
        assert choose(waiting, aging=30).tenant == "free"


class TestReservedRoom:
    def test_free_jobs_and_batch_lines_leave_the_reserved_slots(self):
        free, batch = ready("f", 2, waited=9), ready("b", BATCH_BAND, waited=9)
        pro, top = ready("p", 1, waited=1), ready("m", 0, waited=1)
        waiting = entries(free, batch, pro, top)
        assert set(room(waiting, b"4", running=2, reserved=1)) == set(waiting)
        assert set(room(waiting, b"4", running=3, reserved=1)) == {pro.job_id, top.job_id}
        assert room(waiting, b"4", running=4, reserved=1) == {}

    def test_an_aged_free_job_still_leaves_them(self):
        aged = ready("f", 2, waited=999)
        assert room(entries(aged), b"4", running=3, reserved=1) == {}

    def test_a_model_with_no_more_room_than_the_reserve_keeps_none(self):
        free = ready("f", 2, waited=1)
        assert set(room(entries(free), b"1", running=0, reserved=1)) == {free.job_id}
        assert set(room(entries(free), b"2", running=1, reserved=2)) == {free.job_id}

    def test_where_every_plan_shares_a_band_no_plan_reserves(self):
        level = {t: p.model_copy(update={"band": 1}) for t, p in DEFAULT_PLANS.items()}
        free = ready("f", 1, waited=1)
        assert set(room(entries(free), b"4", 3, reserved=1, plans=level)) == {free.job_id}
        assert reserve(level, 1, BATCH_BAND) == 1  # batch lines still do

    def test_unknown_room_gates_nothing(self):
        free = ready("f", 2, waited=1)
        assert set(room(entries(free), None, running=50, reserved=1)) == {free.job_id}

    def test_none_reserved(self):
        free = ready("f", 2, waited=1)
        assert set(room(entries(free), b"4", running=3, reserved=0)) == {free.job_id}


def job_body(tokens: int) -> dict:
    return {
        "type": "chat",
        "input": {
            "model": "llava-llama3",
            "messages": [{"role": "user", "content": "Describe a lighthouse at length."}],
            "max_tokens": tokens,
            "temperature": 0.7,
        },
    }


def submit(gateway, key: str, tokens: int) -> str:
    made = httpx.post(f"{gateway.url}/v1/jobs", json=job_body(tokens), headers=auth(key))
    assert made.status_code in (200, 202), made.text
    return made.json()["id"]


def view(gateway, key: str, job_id: str) -> dict:
    answer = httpx.get(f"{gateway.url}/v1/jobs/{job_id}", headers=auth(key), timeout=30)
    assert answer.status_code == 200, answer.text
    return answer.json()


def sent_at(redis_client, job_id: str) -> float | None:
    """When the fleet handed the job to a worker, if it has."""
    at = redis_client.hget(job_record_key(job_id), "sent_at")
    return float(at) if at is not None else None


def cancel(gateway, key: str, job_id: str) -> None:
    httpx.post(f"{gateway.url}/v1/jobs/{job_id}/cancel", headers=auth(key), timeout=30)


@pytest.mark.usefixtures("worker")
def test_a_max_job_goes_before_free_jobs_that_waited_longer(gateway, tenant_factory, redis_client):
    """Free jobs fill the workers but for the slot they leave to paying plans
    (GPUHOST_FLEET_RESERVED_SLOTS, 1); the rest wait, none at the broker. A Max job that comes
    after them is handed out before any of them."""
    capacity = int(
        wait_for(
            lambda: redis_client.get(fleet_key("llava", "capacity")), 30, "the workers' capacity"
        )
    )
    assert capacity > 1
    free = [tenant_factory.create("free") for _ in range(capacity + 2)]
    running = [submit(gateway, key, 200) for _, key, _ in free[: capacity - 1]]
    waiting: list[tuple[str, str]] = []
    try:
        wait_for(
            lambda: all(redis_client.exists(started_key(j)) for j in running),
            60,
            "the long jobs to fill the workers",
        )
        waiting = [(key, submit(gateway, key, 200)) for _, key, _ in free[capacity - 1 :]]
        wait_for(
            lambda: redis_client.hlen(fleet_key("llava", "ready")) >= len(waiting),
            30,
            "the Free jobs to wait for room",
        )
        # nothing waits in the broker's first-come-first-served queue meanwhile, and the
        # Free jobs leave the reserved slot
        assert redis_client.llen("llava") == 0
        assert redis_client.zcard(fleet_key("llava", "running")) <= capacity - 1
        _, max_key, _ = tenant_factory.create("max")
        urgent = submit(gateway, max_key, 2)
        done = wait_for(
            lambda: (v := view(gateway, max_key, urgent))["status"] == "succeeded" and v,
            300,
            "the Max job to be done",
        )
        assert done["status"] == "succeeded"
        first = sent_at(redis_client, urgent)
        for _, job_id in waiting:
            later = sent_at(redis_client, job_id)
            assert later is None or later > first, "a Free job that waited went first"
    finally:
        for (_, key, _), job_id in zip(free, running, strict=False):
            cancel(gateway, key, job_id)
        for key, job_id in waiting:
            cancel(gateway, key, job_id)


@pytest.mark.usefixtures("worker")
def test_a_request_whose_slot_lapsed_while_it_waited_is_told_so(
    gateway, tenant_factory, redis_client
):
    """The workers full, a Pro request waits for room; its slot lapses (its gateway too slow to
    renew it, as on a starved machine: here, taken away). When room comes it does not run,
    and its client gets a 503 saying why at once, not a wait with no end."""
    capacity = int(
        wait_for(
            lambda: redis_client.get(fleet_key("llava", "capacity")), 30, "the workers' capacity"
        )
    )
    fillers = [tenant_factory.create("max") for _ in range(capacity)]
    running = [submit(gateway, key, 400) for _, key, _ in fillers]
    try:
        wait_for(
            lambda: all(redis_client.exists(started_key(j)) for j in running),
            60,
            "long jobs to fill the workers",
        )
        tenant_id, key, _ = tenant_factory.create("pro")
        answer: list[httpx.Response] = []
        asking = threading.Thread(
            target=lambda: answer.append(
                httpx.post(
                    f"{gateway.url}/api/chat",
                    json=chat_body(num_predict=2) | {"stream": False},
                    headers=auth(key),
                    timeout=120,
                )
            )
        )
        asking.start()
        ready = fleet_key("llava", "ready")
        waiting = wait_for(
            lambda: [j.decode() for j in redis_client.hkeys(ready) if j.decode() not in running],
            60,
            "the Pro request to wait for room",
        )
        [job_id] = waiting
        redis_client.zrem(slots_key(str(tenant_id)), job_id)  # its slot lapses
    finally:
        for (_, filler, _), job_id in zip(fillers, running, strict=True):
            cancel(gateway, filler, job_id)
    asking.join(120)
    assert answer and answer[0].status_code == 503, answer and answer[0].text
    assert "slot lapsed while it waited" in answer[0].json()["error"]


@pytest.mark.usefixtures("worker")
def test_jobs_queued_past_the_allowance_end_402_unbilled(
    gateway, tenant_factory, sessions, redis_client
):
    """A Free tenant half a millisecond of GPU time short of its allowance (GPU time is billed
    to the millisecond) queues three jobs: the first runs and spends it; the others, started
    after, end with the door's 402."""
    tenant_id, key, _ = tenant_factory.create("free")
    short = 0.0005  # under the least a run is billed, 0.001 s
    with transaction(sessions) as session:
        record_usage(session, tenant_id, 600 - short)  # Free's allowance: 600 GPU-seconds
    holder = hold_slot(redis_client, tenant_id)  # none starts before all three are queued
    try:
        jobs = [submit(gateway, key, 32) for _ in range(3)]
    finally:
        free_slot(redis_client, tenant_id, holder)
    ended = [
        wait_for(
            lambda j=j: (v := view(gateway, key, j))["status"] in ("succeeded", "failed") and v,
            120,
            f"job {j} to end",
        )
        for j in jobs
    ]
    assert ended[0]["status"] == "succeeded"
    for refused in ended[1:]:
        assert refused["status"] == "failed" and "are used up" in refused["error"], refused
    (billed,) = usage_rows(sessions, jobs[0])
    assert billed.gpu_seconds >= 0.001
    assert not usage_rows(sessions, jobs[1]) and not usage_rows(sessions, jobs[2])


@pytest.mark.usefixtures("worker")
def test_a_tier_change_reaches_queued_jobs(gateway, tenant_factory, sessions):
    """A Pro tenant's six queued jobs, its tier set to Free while the first run: the jobs that
    start after run one at a time (the ledger's start and end times never overlap)."""
    tenant_id, key, _ = tenant_factory.create("pro")
    jobs = [submit(gateway, key, 150) for _ in range(6)]
    wait_for(
        lambda: view(gateway, key, jobs[0])["status"] in ("running", "succeeded"),
        60,
        "the first job to start",
    )
    with transaction(sessions) as session:
        tenants.set_tier(session, str(tenant_id), "free", TIERS)
    changed = time.time()
    for job_id in jobs:
        wait_for(
            lambda j=job_id: view(gateway, key, j)["status"] == "succeeded",
            120,
            f"job {job_id} to end",
        )
    runs = sorted(
        (row.started_at.timestamp(), row.finished_at.timestamp())
        for job_id in jobs
        for row in usage_rows(sessions, job_id)
    )
    after = [run for run in runs if run[0] > changed + 0.5]  # a scheduler's pass under way
    assert after, "no job started after the change: make the jobs longer"
    for (_, end), (start, _) in zip(after, after[1:], strict=False):
        assert start >= end, f"two Free jobs overlapped: {after}"


@pytest.fixture(scope="module")
def short_line_gateway(stack_env, tmp_path_factory):
    """At most three requests, jobs and batches wait per tenant."""
    env = stack_env | {"GPUHOST_ADMISSION_QUEUE_LENGTH": "3"}
    yield from running_gateway("gateway-short-line", env, tmp_path_factory)


def test_async_jobs_and_batches_wait_in_the_tenants_bounded_line(
    short_line_gateway, tenant_factory, redis_client
):
    """A Free key whose one slot is taken posts jobs: three wait, the fourth is refused before
    anything of it is kept; so is a batch."""
    tenant_id, key, _ = tenant_factory.create("free")
    holder = hold_slot(redis_client, tenant_id)  # no job of its can start meanwhile
    made, refused = [], None
    try:
        for _ in range(10):
            answer = httpx.post(
                f"{short_line_gateway.url}/v1/jobs", json=job_body(200), headers=auth(key)
            )
            if answer.status_code == 429:
                refused = answer
                break
            assert answer.status_code in (200, 202), answer.text
            made.append(answer.json()["id"])
        assert refused is not None and len(made) == 3, made
        assert "already wait in line" in refused.json()["error"]["message"]
        waiting = (waiting_key(str(tenant_id)), IN_HAND, str(tenant_id))
        assert redis_client.eval(WAITING_COUNT, 2, *waiting) == 3  # a scheduler's hand too
        batch = httpx.post(
            f"{short_line_gateway.url}/v1/batches",
            files={"file": ("b.jsonl", b'{"custom_id": "a", "type": "chat", "input": {}}')},
            headers=auth(key),
        )
        assert batch.status_code == 429, batch.text
    finally:
        for job_id in made:
            cancel(short_line_gateway, key, job_id)
        free_slot(redis_client, tenant_id, holder)


def test_a_job_in_a_schedulers_hand_still_counts_as_waiting(redis_client):
    """Between a scheduler taking a tenant's job off its queue and putting it back (no slot
    free), the job still waits: a tenant's line is counted with it, once, so that no job or
    batch slips past the line's bound in that moment."""
    tenant, other = str(uuid.uuid4()), str(uuid.uuid4())
    queue = waiting_key(tenant)

    def count() -> int:
        return redis_client.eval(WAITING_COUNT, 2, queue, IN_HAND, tenant)

    try:
        redis_client.rpush(queue, "a", "b")
        redis_client.hset(IN_HAND, mapping={"c": tenant, "x": other})  # taken off to place
        assert count() == 3
        redis_client.lpush(queue, "c")  # put back first in line, not yet let go of
        assert count() == 3
        redis_client.hdel(IN_HAND, "c")
        assert count() == 3
    finally:
        redis_client.delete(queue)
        redis_client.hdel(IN_HAND, "c", "x")


@pytest.mark.usefixtures("worker")  # its next line is a job, run to the batch's end
def test_a_batch_line_longer_than_a_request_is_refused_unread(gateway, tenant_factory):
    """A 60 MB line (a request may be 20 MB): that line's error says so, the next line is a
    job, and the gateway never held the line (its memory grows by far less than the line)."""
    _, key, _ = tenant_factory.create("pro")
    padding = "x" * (60 * 1024 * 1024)
    upload = (
        b'{"custom_id": "huge", "type": "chat", "input": {"model": "llava-llama3", '
        + b'"messages": [{"role": "user", "content": "'
        + padding.encode()
        + b'"}]}}\n'
        + b'{"custom_id": "small", "type": "chat", "input": {"model": "llava-llama3", '
        + b'"messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}}\n'
    )
    del padding
    process = psutil.Process(gateway.popen.pid)
    before, peak, done = process.memory_info().rss, [0], threading.Event()

    def sample():
        while not done.is_set():
            peak[0] = max(peak[0], process.memory_info().rss)
            done.wait(0.02)

    watcher = threading.Thread(target=sample)
    watcher.start()
    try:
        answer = httpx.post(
            f"{gateway.url}/v1/batches",
            files={"file": ("b.jsonl", upload, "application/jsonl")},
            headers=auth(key),
            timeout=300,
        )
    finally:
        done.set()
        watcher.join()
    assert answer.status_code == 201, answer.text
    # at most a request's worth (20 MB) in hand at a time, never the line (it grew by three
    # times the line before: the line's bytes, its text, its JSON)
    grew = peak[0] - before
    assert grew < 60 * 1024 * 1024, f"the gateway grew by {grew} bytes"
    batch_id = answer.json()["id"]
    ended = wait_for(
        lambda: (
            (b := httpx.get(f"{gateway.url}/v1/batches/{batch_id}", headers=auth(key)).json())[
                "status"
            ]
            == "completed"
            and b
        ),
        120,
        "the batch to end",
    )
    assert ended["request_counts"] == {"total": 2, "completed": 1, "failed": 1}
    lines = [
        json.loads(line)
        for line in httpx.get(f"{gateway.url}/v1/batches/{batch_id}/output", headers=auth(key))
        .text.strip()
        .splitlines()
    ]
    huge = next(line for line in lines if line["custom_id"] == "huge")
    assert "the most a request may be" in huge["error"]["message"]
