"""Structured logs: with GPUHOST_LOG_FORMAT=json, every line a request leaves in the gateway's
and the worker's logs is a JSON object that carries its request id and tenant id, and no
secret appears in any line, even one a client put in a URL."""

import json
from urllib.parse import urlencode

import httpx
import pytest

from harness.helpers import ask, auth
from tests.conftest import ADMIN_TOKEN, apart, stack_apart

pytestmark = pytest.mark.services


@pytest.fixture(scope="module")
def json_stack(stack_env, tmp_path_factory):
    """A gateway and a worker of their own (their own Redis database), logging JSON lines."""
    env = apart(stack_env) | {"GPUHOST_LOG_FORMAT": "json"}
    yield from stack_apart("json", env, tmp_path_factory)


def lines_about(process, needle: str) -> list[dict]:
    """The process's log lines that mention `needle`, each parsed (it must be JSON)."""
    found = []
    for line in process.log.read_text(errors="replace").splitlines():
        if needle in line:
            found.append(json.loads(line))
    return found


def test_a_requests_lines_carry_its_ids_and_no_secret(json_stack, tenant_factory):
    gateway, worker = json_stack
    tenant_id, key, _ = tenant_factory.create("pro")
    answered = ask(gateway, key)
    assert answered.status_code == 200, answered.text
    request_id = answered.headers["x-request-id"]
    secret = httpx.get(f"{gateway.url}/v1/webhooks/secret", headers=auth(key)).json()["key"]
    # secrets where a careless client puts them: in URLs, which the access log writes
    for leaked in (key, ADMIN_TOKEN, secret):
        httpx.get(f"{gateway.url}/healthz", params={"token": leaked})
    httpx.get(f"{gateway.url}/admin/tenants", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"})
    gateway_lines = lines_about(gateway, request_id)
    worker_lines = lines_about(worker, request_id)
    assert gateway_lines and worker_lines
    for line in gateway_lines + worker_lines:
        assert {"time", "level", "logger", "message"} <= set(line), line
        assert line["request_id"] == request_id and line["tenant_id"] == str(tenant_id), line
    assert any(line["logger"] == "uvicorn.access" for line in gateway_lines)
    [ended] = [line for line in worker_lines if "GPU-seconds" in line["message"]]
    assert ended["model"] == "llava-llama3" and ended["level"] == "INFO"
    for process in (gateway, worker):
        text = process.log.read_text(errors="replace")
        for leaked in (key, ADMIN_TOKEN, secret):
            in_url = urlencode({"token": leaked}).removeprefix("token=")
            assert leaked not in text and in_url not in text, (process.name, leaked[:8])
        assert "[redacted]" in text or process is worker
