"""Concurrent requests from different tenants share batches on one worker, and their usage
records add up to the time the worker's engine was busy."""

import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from harness.helpers import auth, chat_body, idle_status, png, usage_rows


def test_tenants_share_batches_and_records_add_up_to_busy_time(
    worker, gateway, tenant_factory, redis_client, sessions
):
    keys = [tenant_factory.create("pro")[1] for _ in range(4)]
    bodies = [
        chat_body("Describe this.", images=[png(color="red")], num_predict=150) | {"stream": False},
        chat_body("Hello!", num_predict=200) | {"stream": False},
        chat_body("Count to ten.", num_predict=120, temperature=0) | {"stream": False},
        chat_body("Two images?", images=[png(), png(color="blue")], num_predict=80)
        | {"stream": False},
    ]
    before = idle_status(redis_client, after=time.time())

    def send(i: int) -> httpx.Response:
        return httpx.post(
            f"{gateway.url}/api/chat", json=bodies[i], headers=auth(keys[i]), timeout=120
        )

    with ThreadPoolExecutor(len(bodies)) as pool:
        responses = list(pool.map(send, range(len(bodies))))
    assert [r.status_code for r in responses] == [200] * len(bodies)
    after = idle_status(redis_client, after=time.time())

    records = [usage_rows(sessions, r.headers["x-request-id"])[0] for r in responses]
    billed = sum(record.gpu_seconds for record in records)
    busy = after.busy_seconds - before.busy_seconds
    assert billed == pytest.approx(busy, rel=0.01)
    for response, record in zip(responses, records, strict=True):
        assert response.json()["gpu_seconds"] == pytest.approx(record.gpu_seconds, abs=1e-6)
    occupancy = (after.decode_tokens - before.decode_tokens) / (
        after.decode_steps - before.decode_steps
    )
    assert occupancy > 1.5, f"requests did not share decode steps (mean batch {occupancy:.2f})"
