"""Real processes for end-to-end tests: gateways and Celery workers, as `gpuhost` runs them."""

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from celery import Celery
from kombu.exceptions import KombuError

from harness.services import services
from workers.contract import celery_app


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(condition, timeout: float, what: str, interval: float = 0.05):
    """Poll `condition` until it returns something truthy; fail after `timeout` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        result = condition()
        if result:
            return result
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


class Process:
    """A `python -m cli ...` child with its output in a log file."""

    def __init__(self, name: str, args: list[str], env: dict[str, str], log_dir: Path):
        self.name = name
        self.log = log_dir / f"{name}.log"
        self._file = self.log.open("wb")
        self.popen = subprocess.Popen(
            [sys.executable, "-m", "cli", *args],
            env={**os.environ, **env},
            stdout=self._file,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30) -> None:
        if self.alive():
            self.popen.send_signal(sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait()
        self._file.close()


class Gateway(Process):
    def __init__(self, name: str, env: dict[str, str], log_dir: Path):
        self.port = free_port()
        super().__init__(
            name, ["serve", "--host", "127.0.0.1", "--port", str(self.port)], env, log_dir
        )
        self.url = f"http://127.0.0.1:{self.port}"

    def wait_ready(self, timeout: float = 60) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.tail()}")
            try:
                return httpx.get(f"{self.url}/readyz", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, timeout, f"{self.name} to be ready", interval=0.2)


class Worker(Process):
    def __init__(
        self, name: str, env: dict[str, str], log_dir: Path, broker_url: str, queue: str = "llava"
    ):
        self.metrics_port = free_port()
        env = env | {"GPUHOST_METRICS_PORT": str(self.metrics_port)}
        super().__init__(name, ["worker", "--queue", queue, "--concurrency", "4"], env, log_dir)
        self.control = celery_app("gpuhost-tests", broker_url)

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.tail()}")
            try:  # a connection of its own each time: the broker may have restarted
                with self.control.connection_for_write() as connection:
                    return bool(self.control.control.ping(timeout=0.5, connection=connection))
            except (OSError, KombuError):
                return False

        wait_for(ready, timeout, f"{self.name} to answer a ping", interval=0.2)


def ping_all(control: Celery, expected: int) -> bool:
    return len(control.control.ping(timeout=0.5)) >= expected


class RedisServer:
    """A redis-server of the test's own, which it may kill and start again on the same port.
    `appendonly`: as the compose file runs it (an append-only file fsynced every second), so a
    restart keeps what was written up to a second before; without it a restart loses all."""

    def __init__(self, directory: Path, appendonly: bool = False):
        self.port = free_port()
        self.directory = directory
        self.appendonly = appendonly
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.popen = None

    def start(self) -> None:
        self.popen = subprocess.Popen(
            [
                services().redis_server,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--save", "",
                "--appendonly", "yes" if self.appendonly else "no",
                "--dir", str(self.directory),
            ],
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        wait_for(self.ping, 30, "redis-server to answer", interval=0.05)

    def ping(self) -> bool:
        import redis

        try:
            return redis.Redis.from_url(self.url, socket_timeout=0.5).ping()
        except redis.RedisError:
            return False

    def kill(self) -> None:
        self.popen.kill()
        self.popen.wait()

    def shutdown(self) -> None:
        """Stop it as a restart does (SIGTERM): with the append-only file, everything it
        acknowledged is on disk when it exits."""
        self.popen.terminate()
        self.popen.wait(30)


class RabbitNode:
    """A RabbitMQ node of the test's own (Debian's rabbitmq-server, run as this user, its data
    in `directory`, no plugins), which it may kill (SIGKILL, the whole node) and start again:
    durable queues and persistent messages come back, connections do not."""

    def __init__(self, directory: Path):
        self.port = free_port()
        self.directory = directory
        self.name = f"gpuhost-{self.port}@localhost"
        self.url = f"amqp://guest:guest@127.0.0.1:{self.port}//"
        (directory / "rabbitmq.conf").write_text(f"listeners.tcp.local = 127.0.0.1:{self.port}\n")
        (directory / "enabled_plugins").write_text("[].\n")
        self.popen = None

    def start(self, timeout: float = 90) -> None:
        d = self.directory
        env = os.environ | {
            "RABBITMQ_NODENAME": self.name,
            "RABBITMQ_CONFIG_FILE": str(d / "rabbitmq.conf"),
            "RABBITMQ_ENABLED_PLUGINS_FILE": str(d / "enabled_plugins"),
            "RABBITMQ_MNESIA_BASE": str(d / "mnesia"),
            "RABBITMQ_LOG_BASE": str(d / "log"),
            "RABBITMQ_PID_FILE": str(d / "pid"),
            "RABBITMQ_DIST_PORT": str(free_port()),
        }
        with (d / "server.log").open("ab") as log:
            self.popen = subprocess.Popen(
                ["/usr/lib/rabbitmq/bin/rabbitmq-server"],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        wait_for(self.accepting, timeout, f"RabbitMQ on port {self.port}", interval=0.1)

    def accepting(self) -> bool:
        if self.popen.poll() is not None:
            raise AssertionError(f"rabbitmq-server exited: see {self.directory / 'server.log'}")
        from kombu import Connection

        try:
            with Connection(self.url, connect_timeout=1) as connection:
                connection.connect()
            return True
        except OSError:
            return False

    def kill(self) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
