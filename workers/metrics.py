"""Prometheus metrics of a worker process, read from its engine at each scrape."""

from collections.abc import Callable

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

COUNTERS = {
    "busy_seconds": "Device time spent on requests (the GPU-seconds to bill).",
    "billed_seconds": "Device time already billed to finished requests.",
    "decode_steps": "Batched LLaVA decode steps.",
    "decode_tokens": "Tokens those decode steps produced (/ steps: mean batch size).",
    "prefill_batches": "LLaVA prefill forward passes (each a group of requests).",
    "prefill_rows": "Requests those prefills took (/ prefill batches: mean group size).",
    "batches": "Stable Diffusion batches run.",
    "batch_requests": "Requests in those batches (/ batches: mean requests per batch).",
}
GAUGES = {
    "active": "Requests running or waiting in the engine.",
    "loaded": "1 while the model is loaded.",
    "size_bytes": "Bytes of model weights loaded.",
    "load_seconds": "Seconds the model's last load took (never billed).",
}


class GpuCollector:
    """Memory and utilisation of each GPU, through NVML (nvidia-ml-py) where a driver is."""

    def __init__(self) -> None:
        try:
            import pynvml

            pynvml.nvmlInit()
            self.nvml = pynvml
            self.count = pynvml.nvmlDeviceGetCount()
        except Exception:  # no package, no driver, no GPU: nothing to report
            self.nvml, self.count = None, 0

    def collect(self):
        if not self.count:
            return
        used = GaugeMetricFamily(
            "gpuhost_gpu_memory_used_bytes", "GPU memory in use.", labels=["gpu"]
        )
        total = GaugeMetricFamily("gpuhost_gpu_memory_total_bytes", "GPU memory.", labels=["gpu"])
        busy = GaugeMetricFamily(
            "gpuhost_gpu_utilization_ratio",
            "Share of the last sample period a kernel ran on the GPU (NVML).",
            labels=["gpu"],
        )
        for index in range(self.count):
            handle = self.nvml.nvmlDeviceGetHandleByIndex(index)
            memory = self.nvml.nvmlDeviceGetMemoryInfo(handle)
            rates = self.nvml.nvmlDeviceGetUtilizationRates(handle)
            used.add_metric([str(index)], float(memory.used))
            total.add_metric([str(index)], float(memory.total))
            busy.add_metric([str(index)], rates.gpu / 100)
        yield from (used, total, busy)


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
    registry.register(GpuCollector())
    start_http_server(port, addr="0.0.0.0", registry=registry)
