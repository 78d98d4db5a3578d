"""Prometheus metrics: the gateway's /metrics, and each worker's own endpoint."""

import json
from collections.abc import Iterator
from types import SimpleNamespace

import httpx
import pytest
from sqlalchemy import select

from billing.models import UsageRecord
from harness.helpers import auth, chat_body, ndjson, samples, value
from harness.processes import Gateway, wait_for
from tests.conftest import running_gateway


def test_gateway_counts_requests_refusals_and_gpu_seconds(worker, gateway, tenant_factory):
    _, key, _ = tenant_factory.create("free")
    before = samples(f"{gateway.url}/metrics")
    assert (
        httpx.post(
            f"{gateway.url}/api/chat",
            json=chat_body(num_predict=2) | {"stream": False},
            headers=auth(key),
            timeout=60,
        ).status_code
        == 200
    )
    with httpx.Client(timeout=60) as client:
        request = client.build_request(
            "POST", f"{gateway.url}/api/chat", json=chat_body(num_predict=4000), headers=auth(key)
        )
        stream = client.send(request, stream=True)
        lines = ndjson(stream)
        next(lines)
        assert (
            client.post(f"{gateway.url}/api/chat", json=chat_body(), headers=auth(key)).status_code
            == 429
        )
        stream.close()
    after = samples(f"{gateway.url}/metrics")

    def grew(name: str, **labels) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert grew("gpuhost_requests_total", route="/api/chat", method="POST", status="200") >= 1
    assert grew("gpuhost_requests_total", route="/api/chat", method="POST", status="429") == 1
    assert grew("gpuhost_refused_total", tier="free", reason="429") == 1
    assert grew("gpuhost_billed_gpu_seconds_total", family="llava", tier="free") > 0
    assert value(after, "gpuhost_request_seconds_count", route="/api/chat") >= 2
    assert grew("gpuhost_jobs_total", model="llava-llama3", tier="free", outcome="completed") >= 1
    assert grew("gpuhost_time_to_first_chunk_seconds_count", family="llava") >= 2
    # The closed stream's slot comes back after the resume grace: in flight drops to 0 again.
    wait_for(
        lambda: value(samples(f"{gateway.url}/metrics"), "gpuhost_in_flight", tier="free") == 0,
        30,
        "the free tier's slot to be released",
    )


def test_worker_metrics(worker, gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    assert (
        httpx.post(
            f"{gateway.url}/api/chat",
            json=chat_body(num_predict=3) | {"stream": False},
            headers=auth(key),
            timeout=60,
        ).status_code
        == 200
    )
    found = samples(f"http://127.0.0.1:{worker.metrics_port}/metrics")
    labels = {"queue": "llava", "model": "llava-llama3"}
    assert value(found, "gpuhost_worker_loaded", **labels) == 1.0
    assert value(found, "gpuhost_worker_size_bytes", **labels) > 0
    assert value(found, "gpuhost_worker_load_seconds", **labels) > 0
    busy = value(found, "gpuhost_worker_busy_seconds_total", **labels)
    assert busy > 0 and value(found, "gpuhost_worker_decode_steps_total", **labels) >= 2
    assert value(found, "gpuhost_worker_billed_seconds_total", **labels) <= busy + 1e-9


async def test_queue_depth_and_outbox_lag_are_read_at_scrape(
    sessions, database_url, tenant_factory
):
    """Against a Redis database of its own: jobs pushed onto the queues' lists are counted."""
    import redis.asyncio as aioredis

    from api.operator.metrics import GatewayMetrics, _read_backlogs
    from api.pipeline.fleet import Fleet
    from api.pipeline.fleet_order import Ready
    from api.settings import GatewaySettings
    from billing.db import async_engine, async_session_factory, transaction
    from harness.helpers import record_usage
    from harness.services import redis_url
    from workers.fleet_keys import fleet_key, fleet_order

    url = redis_url(15)
    client = aioredis.Redis.from_url(url)
    await client.flushdb()
    await client.rpush("llava", "a", "b", "c")
    await client.rpush("sd\x06\x169", "d")  # a priority step's list counts too
    tenant_id, _, _ = tenant_factory.create("pro")
    with transaction(sessions) as session:
        record_usage(session, tenant_id, 1.25)  # no Stripe here: its outbox row stays unsent
    engine = async_engine(database_url)
    state = SimpleNamespace(
        settings=GatewaySettings(database_url=database_url, redis_url=url),
        redis=client,
        sessions=async_session_factory(engine),
        metrics=GatewayMetrics(),
    )
    state.fleet = Fleet(state)
    waiting = Ready("job-1", str(tenant_id), "pro", 1, 0.0, False)
    await client.hset(fleet_key("llava", "ready"), "job-1", json.dumps(waiting.__dict__))
    await client.zadd(fleet_key("llava", "order"), {"job-1": fleet_order(1, 0)})
    await client.set(fleet_key("llava", "capacity"), 4)
    await client.zadd(fleet_key("llava", "running"), {f"{tenant_id}/job-0": 0})
    try:
        await _read_backlogs(state)
    finally:
        await client.flushdb()
        await client.aclose()
        await engine.dispose()
    found = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in state.metrics.registry.collect()
        for s in family.samples
    }
    assert value(found, "gpuhost_queue_depth", queue="llava") == 3
    assert value(found, "gpuhost_queue_depth", queue="sd") == 1
    assert value(found, "gpuhost_outbox_unsent") >= 1
    assert value(found, "gpuhost_outbox_oldest_unsent_seconds") > 0
    assert value(found, "gpuhost_fleet_waiting", queue="llava", tier="pro") == 1
    assert value(found, "gpuhost_fleet_waiting", queue="llava", tier="free") == 0
    assert value(found, "gpuhost_fleet_capacity", queue="llava", state="capacity") == 4
    assert value(found, "gpuhost_fleet_capacity", queue="llava", state="in_use") == 1


@pytest.fixture(scope="module")
def counted_gateway(stack_env, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway of its own: its counters hold this module's requests and no others."""
    yield from running_gateway("counted-gateway", stack_env, tmp_path_factory)


def test_metrics_agree_with_the_ledger_for_every_outcome(
    worker, counted_gateway, tenant_factory, sessions
):
    """Completed and cancelled requests: the billed GPU-seconds counter equals the ledger's
    total, and each outcome is counted (a stream its client dropped is cancelled, and billed
    for the time it ran)."""
    tenant_id, key, _ = tenant_factory.create("pro")
    url = counted_gateway.url
    for _ in range(2):
        done = httpx.post(
            f"{url}/api/chat",
            json=chat_body(num_predict=3) | {"stream": False},
            headers=auth(key),
            timeout=60,
        )
        assert done.status_code == 200
    with httpx.Client(timeout=60) as client:
        request = client.build_request(
            "POST", f"{url}/api/chat", json=chat_body(num_predict=4000), headers=auth(key)
        )
        stream = client.send(request, stream=True)
        next(ndjson(stream))
        stream.close()  # the client goes: cancelled after the resume grace

    def counted() -> dict:
        return samples(f"{url}/metrics")

    wait_for(
        lambda: (
            value(
                counted(),
                "gpuhost_jobs_total",
                model="llava-llama3",
                tier="pro",
                outcome="cancelled",
            )
            == 1
        ),
        60,
        "the cancelled request to be counted",
    )
    found = counted()
    assert (
        value(found, "gpuhost_jobs_total", model="llava-llama3", tier="pro", outcome="completed")
        == 2
    )
    with sessions() as session:
        rows = session.scalars(select(UsageRecord).where(UsageRecord.tenant_id == tenant_id)).all()
    assert len(rows) == 3
    ledger = sum(float(row.gpu_seconds) for row in rows)
    billed = value(found, "gpuhost_billed_gpu_seconds_total", family="llava", tier="pro")
    assert billed == pytest.approx(ledger, abs=1e-5), (billed, ledger)


def test_static_files_have_a_route_label_of_their_own(counted_gateway):
    for name in ("dashboard.js", "dashboard.css", "favicon.svg"):
        assert httpx.get(f"{counted_gateway.url}/dashboard/static/{name}").status_code == 200
    assert httpx.get(f"{counted_gateway.url}/no/such/path").status_code == 404
    found = samples(f"{counted_gateway.url}/metrics")
    static = dict(route="/dashboard/static/{path}", method="GET", status="200")
    assert value(found, "gpuhost_requests_total", **static) == 3
    unmatched = dict(route="unmatched", method="GET", status="404")
    assert value(found, "gpuhost_requests_total", **unmatched) == 1
