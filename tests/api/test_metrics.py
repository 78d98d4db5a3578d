"""Prometheus metrics: the gateway's /metrics, and each worker's own endpoint."""

import httpx
from prometheus_client.parser import text_string_to_metric_families

from tests.helpers import auth, chat_body, ndjson


def samples(url: str) -> dict[tuple, float]:
    text = httpx.get(url, timeout=10).text
    found = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            found[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return found


def value(found: dict, name: str, **labels) -> float:
    return found.get((name, tuple(sorted(labels.items()))), 0.0)


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
    assert grew("gpuhost_billed_gpu_seconds_total", family="llava") > 0
    assert value(after, "gpuhost_request_seconds_count", route="/api/chat") >= 2


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
    busy = value(found, "gpuhost_worker_busy_seconds_total", **labels)
    assert busy > 0 and value(found, "gpuhost_worker_decode_steps_total", **labels) >= 2
    assert value(found, "gpuhost_worker_billed_seconds_total", **labels) <= busy + 1e-9
