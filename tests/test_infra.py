"""Deployment files that are not code: the Grafana dashboard queries metrics the gateway and
workers really expose, and the compose file and Dockerfiles hold together."""

import json
import re
from pathlib import Path
from types import SimpleNamespace

import yaml
from prometheus_client import CollectorRegistry

from api.metrics import GatewayMetrics
from billing.relay import RelayMetrics
from workers.metrics import EngineCollector, GpuCollector

INFRA = Path(__file__).resolve().parents[1] / "infra"


class Nvml:
    """The calls GpuCollector makes of NVML, for a machine with one GPU (there is none here)."""

    def nvmlDeviceGetHandleByIndex(self, index):  # noqa: N802 (NVML's names)
        return index

    def nvmlDeviceGetMemoryInfo(self, handle):  # noqa: N802
        return SimpleNamespace(used=3 * 2**30, total=80 * 2**30)

    def nvmlDeviceGetUtilizationRates(self, handle):  # noqa: N802
        return SimpleNamespace(gpu=40)


def exposed_names() -> set[str]:
    """Sample names the gateway's, a worker's and the relay's /metrics carry."""
    registries = [GatewayMetrics().registry, CollectorRegistry(), RelayMetrics().registry]
    status = {"model": "m", "busy_seconds": 1.0}
    registries[1].register(EngineCollector("llava", lambda: status))
    gpus = GpuCollector()
    gpus.nvml, gpus.count = Nvml(), 1
    registries[1].register(gpus)
    names = set()
    for registry in registries:
        for family in registry.collect():
            names |= {sample.name for sample in family.samples}
            if family.type == "histogram":
                names |= {f"{family.name}_bucket", f"{family.name}_sum", f"{family.name}_count"}
            if family.type == "counter":
                names.add(f"{family.name}_total")
            if family.type == "gauge":
                names.add(family.name)
    return names


def test_the_dashboard_only_queries_metrics_that_exist():
    dashboard = json.loads((INFRA / "grafana" / "gpuhost-dashboard.json").read_text())
    expressions = [t["expr"] for panel in dashboard["panels"] for t in panel["targets"]]
    used = {name for e in expressions for name in re.findall(r"gpuhost_[a-z_]+", e)}
    assert len(used) >= 20
    assert used <= exposed_names(), used - exposed_names()


def test_compose_services_and_images():
    compose = yaml.safe_load((INFRA / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {
        "postgres",
        "redis",
        "migrate",
        "gateway",
        "worker-llava",
        "worker-sd",
        "worker-train",
        "relay",
        "prometheus",
    } <= set(services)
    for name in ("worker-llava", "worker-sd"):
        devices = services[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    pyproject = (INFRA.parent / "pyproject.toml").read_text()
    packages = re.search(r"include = \[(.*)\]", pyproject).group(1)
    packages = {name.strip(' "*') for name in packages.split(",")}
    assert {"api", "workers", "billing", "storage", "tuning", "webhooks"} <= packages
    for dockerfile in ("gateway.Dockerfile", "worker.Dockerfile"):
        text = (INFRA / dockerfile).read_text()
        assert "USER 10001" in text and "HEALTHCHECK" in text
        for package in packages:  # the image holds every package the project installs
            assert f"COPY {package} {package}" in text, (dockerfile, package)
    assert "[models]" not in (INFRA / "gateway.Dockerfile").read_text()  # no model runtimes


def test_gpu_metrics_read_nvml():
    gpus = GpuCollector()
    gpus.nvml, gpus.count = Nvml(), 1
    found = {s.name: s.value for family in gpus.collect() for s in family.samples}
    assert found == {
        "gpuhost_gpu_memory_used_bytes": 3 * 2**30,
        "gpuhost_gpu_memory_total_bytes": 80 * 2**30,
        "gpuhost_gpu_utilization_ratio": 0.4,
    }
