"""Deployment files that are not code: the Grafana dashboard queries metrics the gateway and
workers really expose, and the compose files and Dockerfiles hold together. (The images are
built and the compose stack run by infra/smoke.sh, which CI runs after the tests.)"""

import importlib.util
import json
import re
import tomllib
from pathlib import Path
from types import SimpleNamespace

import yaml
from prometheus_client import CollectorRegistry

from api.operator.metrics import GatewayMetrics
from billing.relay import RelayMetrics
from workers.metrics import EngineCollector, GpuCollector

INFRA = Path(__file__).resolve().parents[1] / "infra"
SMOKE = INFRA / "smoke"


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


def compose_file(name: str) -> dict:
    return yaml.safe_load((INFRA / name).read_text())


def test_compose_services_and_images():
    services = compose_file("docker-compose.yml")["services"]
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
    workers = {name for name in services if name.startswith("worker-")}
    # the GPU layer gives each worker a GPU; the base file runs anywhere (infra/smoke.sh)
    gpu = compose_file("docker-compose.gpu.yml")["services"]
    assert set(gpu) == workers
    for name in workers:
        assert "deploy" not in services[name]
        devices = gpu[name]["deploy"]["resources"]["reservations"]["devices"]
        assert devices[0]["capabilities"] == ["gpu"]
    # every gpuhost container as the chart runs it: read-only root, a writable /tmp
    ours = [s for s in services.values() if "GATEWAY_IMAGE" in s["image"] or "WORKER" in s["image"]]
    assert len(ours) == 6
    assert all(s["read_only"] is True and s["tmpfs"] == ["/tmp"] for s in ours)
    pyproject = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())
    found = pyproject["tool"]["setuptools"]["packages"]["find"]["include"]
    packages = {name.rstrip("*") for name in found}
    assert {"api", "workers", "billing", "storage", "tuning", "webhooks"} <= packages
    admitted = (INFRA.parent / ".dockerignore").read_text().splitlines()
    for dockerfile in ("gateway.Dockerfile", "worker.Dockerfile"):
        text = (INFRA / dockerfile).read_text()
        assert "USER 10001" in text and "HEALTHCHECK" in text
        # the base is a build argument, so that CI builds on bases it made itself
        instructions = [line for line in text.splitlines() if line and not line.startswith("#")]
        assert instructions[0].startswith("ARG ") and "FROM ${" in text
        assert "-c infra/constraints.txt" in text
        for package in packages:  # the image holds every package the project installs
            assert f"COPY {package} {package}" in text, (dockerfile, package)
            assert f"!{package}" in admitted, package
    assert "[models" not in (INFRA / "gateway.Dockerfile").read_text()  # no model runtimes


def test_compose_asks_for_stripe_only_in_the_relay():
    """`docker compose up` without Stripe settings: no variable is required (`${X:?}`), and
    only the relay, in its own profile, is handed the API key."""
    text = (INFRA / "docker-compose.yml").read_text()
    assert not re.search(r"\$\{[A-Z_]+:?\?", text)
    services = compose_file("docker-compose.yml")["services"]
    holding = {name for name, s in services.items() if "STRIPE_API_KEY" in json.dumps(s)}
    assert holding == {"relay"} and services["relay"]["profiles"] == ["stripe"]


def test_the_images_install_pinned_versions():
    """Every dependency of the gateway and the workers has one version in infra/constraints.txt
    (infra/lock.py writes it): a dependency added without locking again fails here."""
    project = tomllib.loads((INFRA.parent / "pyproject.toml").read_text())["project"]
    wanted = project["dependencies"] + project["optional-dependencies"]["models"]
    wanted += project["optional-dependencies"]["vllm"]
    pinned = {}
    for line in (INFRA / "constraints.txt").read_text().splitlines():
        if line and not line.startswith("#"):
            name, version = line.split(";")[0].strip().split("==")
            pinned.setdefault(name, set()).add(version)
    for spec in wanted:
        name = re.match(r"[A-Za-z0-9_.-]+", spec).group().lower().replace("_", "-")
        assert name in pinned, f"{name} is not in infra/constraints.txt: run infra/lock.py"
    # vLLM pins its torch exactly: the CPU worker installs the same one
    assert pinned["torch"] == {"2.13.0"} and len(pinned["vllm"]) == 1


def test_apt_sources_of_a_release(tmp_path):
    """The smoke test's Debian base takes the machine's own mirror, from either format."""
    spec = importlib.util.spec_from_file_location("apt_sources", SMOKE / "apt_sources.py")
    apt_sources = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(apt_sources)
    (tmp_path / "sources.list.d").mkdir()
    (tmp_path / "sources.list").write_text(
        "# deb http://old.example/debian bookworm main\n"
        "deb [arch=amd64] http://mirror.example/debian-security bookworm-security main\n"
    )
    (tmp_path / "sources.list.d" / "debian.sources").write_text(
        "Types: deb\nURIs: http://mirror.example/debian\nSuites: bookworm bookworm-updates\n"
        "Components: main contrib\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n"
        "\nTypes: deb-src\nURIs: http://src.example/debian\nSuites: bookworm\n"
        "\nTypes: deb\nEnabled: no\nURIs: http://off.example/debian\nSuites: bookworm\n"
    )
    (tmp_path / "sources.list.d" / "other.list").write_text("deb http://x.example/ trixie main\n")
    assert apt_sources.lines_for("bookworm", tmp_path) == [
        "deb http://mirror.example/debian bookworm main contrib",
        "deb http://mirror.example/debian-security bookworm-security main",
        "deb http://mirror.example/debian bookworm-updates main contrib",
    ]
    assert apt_sources.lines_for("bullseye", tmp_path) == []


def test_gpu_metrics_read_nvml():
    gpus = GpuCollector()
    gpus.nvml, gpus.count = Nvml(), 1
    found = {s.name: s.value for family in gpus.collect() for s in family.samples}
    assert found == {
        "gpuhost_gpu_memory_used_bytes": 3 * 2**30,
        "gpuhost_gpu_memory_total_bytes": 80 * 2**30,
        "gpuhost_gpu_utilization_ratio": 0.4,
    }
