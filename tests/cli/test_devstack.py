"""`gpuhost dev`, the README's first command: everything up, one request, Ctrl-C, nothing left."""

import re
import signal
import subprocess
import sys
import threading

import httpx
import psutil

from tests.helpers import auth, chat_body, ndjson
from tests.stack import free_port, wait_for


def processes_under(path: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(path in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_dev_serves_a_request_and_ctrl_c_stops_everything(tmp_path):
    state_dir, port = tmp_path / "state", free_port()
    dev = subprocess.Popen(
        [sys.executable, "-m", "cli", "dev", "--port", str(port), "--state-dir", str(state_dir)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(dev.stdout), daemon=True)
    reader.start()
    try:
        key = wait_for(
            lambda: re.search(r"API key\s+(gph_\w+)", "".join(output)), 240, "the dev banner"
        ).group(1)
        assert f"curl http://127.0.0.1:{port}/api/chat" in "".join(output)
        env_file = (state_dir / "env").read_text()
        assert "GPUHOST_DATABASE_URL=" in env_file and "GPUHOST_REDIS_URL=" in env_file

        response = httpx.post(
            f"http://127.0.0.1:{port}/api/chat",
            json=chat_body(num_predict=3),
            headers=auth(key),
            timeout=120,
        )
        assert response.status_code == 200
        assert list(ndjson(response))[-1]["done"] is True

        children = psutil.Process(dev.pid).children(recursive=True)
        assert processes_under(str(state_dir)), "expected PostgreSQL and Redis under the state dir"
        dev.send_signal(signal.SIGINT)
        assert dev.wait(90) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"still running after Ctrl-C: {alive}"
        assert not processes_under(str(state_dir)), "a server of the dev stack is still running"
    finally:
        if dev.poll() is None:
            dev.kill()
            dev.wait()
