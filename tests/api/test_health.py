"""Liveness and readiness, and what the gateway does when Redis is gone."""

import httpx
import pytest

from harness.helpers import auth, chat_body
from harness.processes import Gateway, free_port


def test_ready_when_postgres_redis_and_broker_answer_and_revocations_are_followed(gateway):
    assert httpx.get(f"{gateway.url}/healthz", timeout=10).json() == {"status": "ok"}
    ready = httpx.get(f"{gateway.url}/readyz", timeout=10)
    assert ready.status_code == 200
    checks = {"postgres": "ok", "redis": "ok", "broker": "ok", "revocations": "ok"}
    assert ready.json()["checks"] == checks


@pytest.fixture(scope="module")
def gateway_without_redis(stack_env, tmp_path_factory):
    dead = f"redis://127.0.0.1:{free_port()}/0"
    process = Gateway(
        "gateway-no-redis", stack_env | {"GPUHOST_REDIS_URL": dead}, tmp_path_factory.mktemp("logs")
    )
    try:
        yield process
    finally:
        process.stop()


def test_redis_down_means_not_ready_and_503_never_allow(gateway_without_redis, tenant_factory):
    from harness.processes import wait_for

    gateway = gateway_without_redis

    def answers() -> bool:
        try:
            return httpx.get(f"{gateway.url}/healthz", timeout=2).status_code == 200
        except httpx.HTTPError:
            return False

    wait_for(answers, 60, "the gateway to start", interval=0.2)
    ready = httpx.get(f"{gateway.url}/readyz", timeout=20)
    assert ready.status_code == 503
    assert ready.json()["checks"]["redis"].startswith("error")
    assert ready.json()["checks"]["postgres"] == "ok"
    _, key, _ = tenant_factory.create("max")
    refused = httpx.post(f"{gateway.url}/api/chat", json=chat_body(), headers=auth(key), timeout=30)
    assert refused.status_code == 503
    assert "admission is unavailable" in refused.json()["error"]


def test_a_browser_at_the_root_finds_the_dashboard_and_an_icon(gateway):
    root = httpx.get(f"{gateway.url}/")
    assert root.status_code == 307 and root.headers["location"] == "/dashboard"
    icon = httpx.get(f"{gateway.url}/favicon.ico")
    assert icon.status_code == 200 and icon.headers["content-type"] == "image/svg+xml"
    assert icon.content.startswith(b"<svg")
