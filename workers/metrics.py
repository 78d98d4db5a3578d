"""Prometheus metrics of a worker process, read from its engine at each scrape."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

COUNTERS = {
    "busy_seconds": "Device time spent on requests (the GPU-seconds to bill).",
    "billed_seconds": "Device time already billed to finished requests.",
    "decode_steps": "Batched LLaVA decode steps.",
    "decode_tokens": "Tokens those decode steps produced (/ steps: mean batch size).",
    "batches": "Stable Diffusion batches run.",
    "batch_requests": "Requests in those batches (/ batches: mean requests per batch).",
}
GAUGES = {
    "active": "Requests running or waiting in the engine.",
    "loaded": "1 while the model is loaded.",
    "size_bytes": "Bytes of model weights loaded.",
}


class EngineCollector:
    def __init__(self, queue: str, status: Callable[[], dict]):
        self.queue = queue
        self.status = status

    def collect(self):
        now = self.status()
        labels = [self.queue, now["model"]]
        for name, help_text in COUNTERS.items():
            family = CounterMetricFamily(
                f"gpuhost_worker_{name}", help_text, labels=["queue", "model"]
            )
            family.add_metric(labels, float(now.get(name, 0)))
            yield family
        for name, help_text in GAUGES.items():
            family = GaugeMetricFamily(
                f"gpuhost_worker_{name}", help_text, labels=["queue", "model"]
            )
            family.add_metric(labels, float(now.get(name, 0)))
            yield family


def serve(port: int, queue: str, status: Callable[[], dict]) -> None:
    """Serve /metrics on `port` from a thread of its own."""
    registry = CollectorRegistry()
    registry.register(EngineCollector(queue, status))
    start_http_server(port, addr="0.0.0.0", registry=registry)
