"""The stack the chaos load (`harness/chaos/load.py`, run by `bench/chaos.py` and
`tests/chaos/`) runs against, and the faults it injects into it.

Everything is its own and gone afterwards: a database on the local PostgreSQL that every
process reaches through a TCP proxy (cut for an outage), a redis-server run as the compose file
runs it (append-only), a RabbitMQ node as the Celery broker, a Stripe-compatible server
(`harness/stripe_server.py`), two gateways, LLaVA and Stable Diffusion workers, and the billing
relay. A supervisor starts a process that died again after `RESTART_DELAY`, as Kubernetes
would; each fault is one of `FAULT_KINDS`.
"""

import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import redis

import migrations
from billing import tenants
from billing.db import session_factory, sync_engine, transaction
from harness.processes import Gateway, Process, RabbitNode, RedisServer, Worker, wait_for
from harness.proxy import TcpProxy
from harness.services import (
    TIERS,
    database_url_through,
    drop_database,
    fresh_database,
    postgres_address,
)
from harness.stripe_server import FakeStripe
from workers.tiny import make_all

RESTART_DELAY = 1.0  # a killed process is started again this long after it died
FAULT_KINDS = (
    "worker_kill",
    "gateway_kill",
    "redis_restart",
    "postgres_outage",
    "broker_restart",
    "relay_kill",
)
STRIPE_KEY = "sk_test_chaos"


@dataclass
class Role:
    """One long-running process of the stack, restarted by the supervisor when it dies."""

    name: str
    make: object  # () -> Process
    process: Process | None = None
    starts: int = 0


@dataclass
class FaultDone:
    kind: str
    target: str
    at: float  # seconds since the load began
    seconds: float  # how long the fault lasted (an outage, a restart), 0 for a kill
    slots_back_seconds: float | None = None  # filled in by the load's observer
    in_flight: int = 0  # requests under way when it struck
    notes: dict = field(default_factory=dict)


class ChaosStack:
    def __init__(self, workdir: Path, llava_workers: int = 2, sd_workers: int = 1):
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.database = f"gpuhost_chaos_{uuid.uuid4().hex[:8]}"
        self.database_url = fresh_database(self.database)  # direct: for the harness's reads
        migrations.upgrade(self.database_url)
        self.sessions = session_factory(sync_engine(self.database_url))
        self.proxy = TcpProxy(postgres_address(self.database_url))
        proxied = database_url_through(self.database_url, self.proxy)
        (workdir / "redis").mkdir(exist_ok=True)
        self.redis_server = RedisServer(workdir / "redis", appendonly=True)
        self.redis_server.start()
        self.redis = redis.Redis.from_url(self.redis_server.url, socket_timeout=2)
        (workdir / "rabbitmq").mkdir(exist_ok=True)
        self.rabbit = RabbitNode(workdir / "rabbitmq")
        self.rabbit.start()
        self.stripe = FakeStripe().start()
        models = workdir / "models"
        make_all(models, "llava-llama3", "stable-diffusion")
        self.env = {
            "GPUHOST_DATABASE_URL": proxied,
            "GPUHOST_REDIS_URL": self.redis_server.url,
            "GPUHOST_BROKER_URL": self.rabbit.url,
            "GPUHOST_MODELS_DIR": str(models),
            "GPUHOST_STORAGE_URL": str(workdir / "storage"),
            "GPUHOST_LEASE_TTL_SECONDS": "5",
            "GPUHOST_CLAIM_TTL_SECONDS": "3",
            "GPUHOST_RESUME_GRACE_SECONDS": "30",
            "GPUHOST_STRIPE_API_KEY": STRIPE_KEY,
            "GPUHOST_STRIPE_API_BASE": self.stripe.url,
            "GPUHOST_STRIPE_TIMEOUT_SECONDS": "5",
            "GPUHOST_RELAY_INTERVAL_SECONDS": "1",
            "GPUHOST_RELAY_BACKOFF_BASE_SECONDS": "0.5",
            "GPUHOST_CREDENTIAL_FAILURES_LIMIT": "0",
        }
        self.roles: dict[str, Role] = {}
        for n in range(2):
            self._role(f"gateway-{n}", lambda name: Gateway(name, self.env, self.logs))
        for n in range(llava_workers):
            self._role(f"llava-{n}", lambda name: self._worker(name, "llava"))
        for n in range(sd_workers):
            self._role(f"sd-{n}", lambda name: self._worker(name, "sd"))
        self._role("relay", lambda name: Process(name, ["billing", "relay"], self.env, self.logs))
        self._stopped = threading.Event()
        self._lock = threading.Lock()
        self._supervisor = threading.Thread(target=self._supervise, daemon=True)

    def _worker(self, name: str, queue: str) -> Worker:
        return Worker(name, self.env, self.logs, self.rabbit.url, queue)

    def _role(self, name: str, make) -> None:
        self.roles[name] = Role(name, lambda: make(f"{name}.{self.roles[name].starts}"))

    # -- lifecycle

    def start(self) -> None:
        for role in self.roles.values():
            self._start(role)
        for role in self.roles.values():
            if hasattr(role.process, "wait_ready"):
                role.process.wait_ready(timeout=180)
        self._supervisor.start()
        self.started_month = datetime.now(UTC).strftime("%Y-%m")

    def _start(self, role: Role) -> None:
        role.process = role.make()
        role.starts += 1

    def _supervise(self) -> None:
        died: dict[str, float] = {}
        while not self._stopped.wait(0.2):
            with self._lock:
                for role in self.roles.values():
                    if role.process.alive():
                        continue
                    since = died.setdefault(role.name, time.monotonic())
                    if time.monotonic() - since >= RESTART_DELAY:
                        role.process.stop()  # closes its log
                        self._start(role)
                        died.pop(role.name)

    def gateways(self) -> list[Gateway]:
        return [r.process for r in self.roles.values() if isinstance(r.process, Gateway)]

    def ready_gateway_urls(self) -> list[str]:
        return [g.url for g in self.gateways() if g.alive()]

    def create_tenants(self, per_tier: int) -> list[tuple[str, str, str]]:
        """(tenant id, API key, tier), `per_tier` of each tier."""
        made = []
        for tier in ("free", "pro", "max"):
            for _ in range(per_tier):
                with transaction(self.sessions) as session:
                    name = f"chaos-{tier}-{uuid.uuid4().hex[:6]}"
                    tenant = tenants.create_tenant(session, name, tier, TIERS)
                    _, secret = tenants.create_key(session, tenant.id, tenants.DEFAULT_SCOPES)
                    made.append((str(tenant.id), secret, tier))
        return made

    def stop(self) -> None:
        self._stopped.set()
        if self._supervisor.is_alive():
            self._supervisor.join()
        for role in self.roles.values():
            if role.process is not None:
                role.process.stop()
        self.stripe.stop()
        self.rabbit.kill()
        self.redis_server.kill()
        self.proxy.close()
        self.sessions.kw["bind"].dispose()
        drop_database(self.database)

    # -- faults

    def inject(self, kind: str, rng) -> FaultDone:
        began = time.monotonic()
        target, notes = getattr(self, f"_{kind}")(rng)
        return FaultDone(kind, target, began, time.monotonic() - began, notes=notes)

    def _kill(self, role: Role) -> str:
        process = role.process
        process.popen.send_signal(signal.SIGKILL)
        process.popen.wait()
        return process.name

    def _worker_kill(self, rng) -> tuple[str, dict]:
        busy = self._busy_workers()
        names = busy or [n for n in self.roles if n.startswith(("llava", "sd"))]
        role = self.roles[rng.choice(sorted(names))]
        return self._kill(role), {"busy": bool(busy)}

    def _busy_workers(self) -> list[str]:
        """Roles whose worker holds a claim right now (it runs a request)."""
        try:
            holders = {self.redis.get(key) for key in self.redis.scan_iter("gpuhost:job:*:claim")}
        except redis.RedisError:
            return []
        pids = {int(h.decode().rsplit(":", 1)[1]) for h in holders if h}
        return [
            name
            for name, role in self.roles.items()
            if isinstance(role.process, Worker) and role.process.popen.pid in pids
        ]

    def _gateway_kill(self, rng) -> tuple[str, dict]:
        names = [n for n in self.roles if n.startswith("gateway")]
        return self._kill(self.roles[rng.choice(names)]), {}

    def _redis_restart(self, rng) -> tuple[str, dict]:
        self.redis_server.shutdown()  # a restart (SIGTERM): what it acknowledged survives
        time.sleep(1.0)
        self.redis_server.start()
        return "redis", {}

    def _postgres_outage(self, rng) -> tuple[str, dict]:
        seconds = rng.uniform(5, 15)
        self.proxy.cut()
        time.sleep(seconds)
        self.proxy.restore()
        return "postgres", {"unreachable_seconds": round(seconds, 1)}

    def _broker_restart(self, rng) -> tuple[str, dict]:
        self.rabbit.kill()
        self.rabbit.start()
        return "rabbitmq", {}

    def _relay_kill(self, rng) -> tuple[str, dict]:
        """Stop the relay the moment Stripe has counted its next event, let the 2xx reach its
        socket, and kill it before it can read the answer (and commit)."""
        role = self.roles["relay"]
        killed = threading.Event()

        def stop_then_kill() -> None:
            pid = role.process.popen.pid
            os.kill(pid, signal.SIGSTOP)
            threading.Timer(0.5, lambda: (os.kill(pid, signal.SIGKILL), killed.set())).start()

        self.stripe.after_next_meter_event(stop_then_kill)
        if not killed.wait(120):
            raise RuntimeError("the relay sent no meter event within 120 s")
        role.process.popen.wait()
        return role.process.name, {}

    def reconcile(self, month: str) -> dict:
        """`gpuhost billing reconcile --period MONTH`, as an operator runs it: its report and
        its exit status."""
        env = os.environ | self.env | {"GPUHOST_DATABASE_URL": self.database_url}
        done = subprocess.run(
            [sys.executable, "-m", "cli", "billing", "reconcile", "--period", month],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        found = json.loads(done.stdout) if done.stdout.strip() else {"customers": []}
        return found | {"exit": done.returncode, "stderr": done.stderr[-500:]}

    def wait_settled(self, timeout: float) -> None:
        """Every process up again and ready."""
        deadline = time.monotonic() + timeout
        for role in self.roles.values():
            left = max(1, deadline - time.monotonic())
            wait_for(lambda r=role: r.process.alive(), left, f"{role.name} to be up")
            if hasattr(role.process, "wait_ready"):
                role.process.wait_ready(timeout=max(1, deadline - time.monotonic()))


__all__ = ["ChaosStack", "FAULT_KINDS", "FaultDone", "STRIPE_KEY"]
