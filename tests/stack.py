"""Real processes for end-to-end tests: gateways and Celery workers, as `gpuhost` runs them."""

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
from celery import Celery

from workers.contract import celery_config


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
        self.control = Celery("gpuhost-tests")
        self.control.conf.update(celery_config(broker_url))

    def wait_ready(self, timeout: float = 120) -> None:
        def ready() -> bool:
            if not self.alive():
                raise AssertionError(f"{self.name} exited:\n{self.tail()}")
            return bool(self.control.control.ping(timeout=0.5))

        wait_for(ready, timeout, f"{self.name} to answer a ping", interval=0.2)


def ping_all(control: Celery, expected: int) -> bool:
    return len(control.control.ping(timeout=0.5)) >= expected
