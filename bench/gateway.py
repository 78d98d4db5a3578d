"""What the gateway adds to a request, beside LiteLLM's proxy doing the equivalent work.

    python bench/gateway.py [--requests 400] [--litellm /path/to/litellm] [--broker URL]
                            [--client hey|python] [--traced]

gpuhost: a gateway and one worker with the no-op `echo` engine (GPUHOST_ENGINE=echo: it
answers at once and uses no device), on a scratch database and Redis database 11 of the
local server; each request goes the whole way (key, quota and slot, enqueue through Celery,
the worker, its usage record, the stream back). LiteLLM: its proxy (`litellm --config`) with
a `mock_response` model and its master key (no database, so no virtual keys: its key check is
a string comparison). Both get the same OpenAI-style chat completions, one at a time and 32
at once, from `hey` (a load generator written in Go: `apt-get install hey`), or with
`--client python` from an asyncio httpx client (which spends more CPU per request than the
gateway does, on the same two cores, and stretches the tail). Round-trip latency is what is
added: the engines take no time. Prints one JSON line per server and concurrency, with the CPU
each process spent per request. `--traced`: the gateway and the worker send their spans
(OpenTelemetry, OTLP/HTTP) to a receiver in this process (harness/otlp.py), as to a collector.
"""

import argparse
import asyncio
import csv
import io
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

import httpx
import psutil
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scratch import scratch_stack  # noqa: E402
from billing import tenants  # noqa: E402
from billing.db import session_factory, sync_engine, transaction  # noqa: E402
from config.plans import DEFAULT_PLANS  # noqa: E402
from harness.otlp import TraceReceiver  # noqa: E402
from harness.processes import Gateway, Process, free_port, wait_for  # noqa: E402

BODY = {
    "model": "llava-llama3",
    "messages": [{"role": "user", "content": "hello there general kenobi"}],
    "max_tokens": 4,
}
# One tenant on a plan of its own that allows every request of the load in flight at once.
BENCH_PLAN = DEFAULT_PLANS["max"].model_copy(update={"tier": "bench", "concurrency": 64})


def summary(latencies_ms: list[float], failures: int, wall: float, concurrency: int) -> dict:
    latencies_ms.sort()
    return {
        "concurrency": concurrency,
        "requests": len(latencies_ms) + failures,
        "failed": failures,
        "p50_ms": round(statistics.median(latencies_ms), 2),
        "p99_ms": round(latencies_ms[int(len(latencies_ms) * 0.99) - 1], 2),
        "requests_per_second": round(len(latencies_ms) / wall, 1),
    }


def hey_load(url: str, key: str, requests: int, concurrency: int) -> dict:
    """`hey` sends the requests over `concurrency` keep-alive connections; its CSV has one
    row per answered request (response time and start offset, seconds)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(
        [
            *("hey", "-n", str(requests), "-c", str(concurrency), "-m", "POST"),
            *("-T", "application/json", "-H", f"Authorization: Bearer {key}"),
            *("-d", json.dumps(BODY), "-t", "60", "-o", "csv", url),
        ],
        capture_output=True,
        text=True,
        check=True,
        timeout=900,
    )
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    rows = list(csv.DictReader(io.StringIO(done.stdout)))
    answered = [r for r in rows if r["status-code"] == "200"]
    ends = [float(r["offset"]) + float(r["response-time"]) for r in rows]
    wall = max(ends) - min(float(r["offset"]) for r in rows)
    result = summary(
        [float(r["response-time"]) * 1000 for r in answered],
        requests - len(answered),
        wall,
        concurrency,
    )
    used = (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)
    return result | {"_client_cpu_seconds": used}


async def python_load(url: str, key: str, requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    cpu = psutil.Process().cpu_times()
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one_client() -> None:
            nonlocal failures
            headers = {"Authorization": f"Bearer {key}"}
            while True:
                try:
                    queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                started = time.perf_counter()
                response = await client.post(url, json=BODY, headers=headers)
                if response.status_code == 200:
                    latencies.append((time.perf_counter() - started) * 1000)
                else:
                    failures += 1

        started = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(concurrency)))
        wall = time.perf_counter() - started
    after = psutil.Process().cpu_times()
    used = (after.user - cpu.user) + (after.system - cpu.system)
    return summary(latencies, failures, wall, concurrency) | {"_client_cpu_seconds": used}


def load(client: str, url: str, key: str, requests: int, concurrency: int) -> dict:
    if client == "hey":
        return hey_load(url, key, requests, concurrency)
    return asyncio.run(python_load(url, key, requests, concurrency))


def stages(sessions, since: datetime) -> dict:
    """Where a request's time went, from its usage record (medians, ms): from the gateway's
    making the job to the worker's start (admission, enqueue and the Celery hop), and on the
    worker up to its record."""
    with sessions() as session:
        rows = session.execute(
            text(
                "SELECT queue_seconds, extract(epoch FROM finished_at - started_at) "
                "FROM usage_records WHERE finished_at >= :since"
            ),
            {"since": since},
        ).all()
    if not rows:
        return {}
    return {
        "enqueue_to_worker_ms_p50": round(statistics.median(r[0] for r in rows) * 1000, 2),
        "on_worker_ms_p50": round(statistics.median(float(r[1]) for r in rows) * 1000, 2),
    }


def cpu_seconds(processes: dict[str, list[psutil.Process]]) -> dict[str, float]:
    """CPU time (user + system) used so far by each named group of processes."""
    used = {}
    for name, group in processes.items():
        total = 0.0
        for process in group:
            try:
                times = process.cpu_times()
            except psutil.NoSuchProcess:
                continue
            total += times.user + times.system
        used[name] = total
    return used


def services() -> dict[str, list[psutil.Process]]:
    """The local Redis, PostgreSQL (every backend) and RabbitMQ server processes."""
    found: dict[str, list[psutil.Process]] = {"redis": [], "postgres": [], "rabbitmq": []}
    for process in psutil.process_iter(["name"]):
        name = process.info["name"] or ""
        if name.startswith("redis-server"):
            found["redis"].append(process)
        elif name.startswith("postgres"):
            found["postgres"].append(process)
        elif name.startswith("beam.smp"):
            found["rabbitmq"].append(process)
    return found


def measure(client: str, url: str, key: str, requests: int, concurrency: int, processes) -> dict:
    """One load run, with the CPU each process spent per request (ms), and the requests per
    second one gateway process could answer on a core of its own (1 / its CPU per request)."""
    groups = processes | services()
    before = cpu_seconds(groups)
    result = load(client, url, key, requests, concurrency)
    after = cpu_seconds(groups)
    done = max(1, result["requests"] - result["failed"])
    cpu = {name: (after[name] - before[name]) * 1000 / done for name in groups}
    cpu["client"] = result.pop("_client_cpu_seconds") * 1000 / done
    result["cpu_ms_per_request"] = {name: round(ms, 3) for name, ms in cpu.items() if ms > 0}
    if cpu["gateway"] > 0:
        result["gateway_requests_per_cpu_second"] = round(1000 / cpu["gateway"])
    return result


def run_gpuhost(
    client: str, requests: int, broker: str | None, receiver: TraceReceiver | None = None
) -> list[dict]:
    logs = Path(tempfile.mkdtemp())
    processes = []
    with scratch_stack("gw", 11) as (url, redis_url):
        try:
            sessions = session_factory(sync_engine(url))
            with transaction(sessions) as session:
                tenant = tenants.create_tenant(session, "bench", "bench", {"bench": 64})
                key = tenants.create_key(session, tenant.id)[1]
            plans = DEFAULT_PLANS | {"bench": BENCH_PLAN}
            env = {
                "GPUHOST_DATABASE_URL": url,
                "GPUHOST_REDIS_URL": redis_url,
                "GPUHOST_PLANS": json.dumps(
                    {t: p.model_dump(mode="json") for t, p in plans.items()}
                ),
            }
            if broker:
                env["GPUHOST_BROKER_URL"] = broker
            if receiver is not None:
                env["GPUHOST_OTEL_EXPORTER_OTLP_ENDPOINT"] = receiver.url
            worker = Process(
                "worker-echo",
                ["worker", "--queue", "llava", "--concurrency", "32"],
                env | {"GPUHOST_ENGINE": "echo"},
                logs,
            )
            processes.append(worker)
            gateway = Gateway("gateway-bench", env, logs)
            processes.append(gateway)
            gateway.wait_ready()
            endpoint = f"{gateway.url}/v1/chat/completions"
            wait_for(
                lambda: (
                    httpx.post(
                        endpoint, json=BODY, headers={"Authorization": f"Bearer {key}"}, timeout=10
                    ).status_code
                    == 200
                ),
                60,
                "the echo worker",
            )
            load(client, endpoint, key, 200, 8)  # warm
            results = []
            measured = {
                "gateway": [psutil.Process(gateway.popen.pid)],
                "worker": [psutil.Process(worker.popen.pid)],
            }
            for c in (1, 32):
                since = datetime.now(UTC)
                result = measure(client, endpoint, key, requests * c // 8 or requests, c, measured)
                row = {"server": "gpuhost", "broker": broker or "redis"} | result
                results.append(row | stages(sessions, since))
            return results
        finally:
            for process in processes:
                process.stop()


def run_litellm(client: str, executable: str, requests: int) -> list[dict]:
    port = free_port()
    scratch = Path(tempfile.mkdtemp())
    config = scratch / "litellm.yaml"
    config.write_text(
        json.dumps(  # YAML is a superset of JSON
            {
                "model_list": [
                    {
                        "model_name": "llava-llama3",
                        "litellm_params": {
                            "model": "openai/mock",
                            "mock_response": "hello there general kenobi",
                        },
                    }
                ],
                "general_settings": {"master_key": "sk-bench-master"},
                "litellm_settings": {"telemetry": False},
            }
        )
    )
    log = (scratch / "litellm.log").open("wb")
    server = subprocess.Popen(
        [
            executable,
            "--config",
            str(config),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--num_workers",
            "1",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ | {"LITELLM_LOG": "ERROR"},
        start_new_session=True,
    )
    base = f"http://127.0.0.1:{port}"
    try:

        def ready() -> bool:
            assert server.poll() is None, (scratch / "litellm.log").read_text()[-3000:]
            try:
                return httpx.get(f"{base}/health/liveliness", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, 180, "LiteLLM's proxy")
        endpoint = f"{base}/v1/chat/completions"
        key = "sk-bench-master"
        load(client, endpoint, key, 200, 8)  # warm
        # its CLI may run the server in a child process: count the whole tree
        tree = psutil.Process(server.pid)
        measured = {"gateway": [tree, *tree.children(recursive=True)]}
        return [
            {"server": "litellm-proxy"}
            | measure(client, endpoint, key, requests * c // 8 or requests, c, measured)
            for c in (1, 32)
        ]
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="at concurrency 8; scaled")
    parser.add_argument("--litellm", default=shutil.which("litellm"), help="litellm executable")
    parser.add_argument("--broker", help="Celery broker URL (default: the Redis database)")
    parser.add_argument("--traced", action="store_true", help="traces sent to a receiver")
    parser.add_argument(
        "--client",
        choices=("hey", "python"),
        default="hey" if shutil.which("hey") else "python",
        help="load generator (default: hey when installed)",
    )
    args = parser.parse_args()
    receiver = TraceReceiver() if args.traced else None
    try:
        rows = run_gpuhost(args.client, args.requests, args.broker, receiver)
    finally:
        if receiver is not None:
            print(json.dumps({"spans_received": len(receiver.spans)}), flush=True)
            receiver.close()
    if args.litellm:
        rows += run_litellm(args.client, args.litellm, args.requests)
    else:
        print(json.dumps({"litellm": "not installed: pip install 'litellm[proxy]'"}))
    for row in rows:
        print(json.dumps({"client": args.client, "traced": args.traced} | row), flush=True)


if __name__ == "__main__":
    main()
