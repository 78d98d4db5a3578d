"""What the gateway adds to a request, beside LiteLLM's proxy doing the equivalent work.

    python bench/gateway.py [--requests 400] [--litellm /path/to/litellm]

gpuhost: a gateway and one worker with the no-op `echo` engine (GPUHOST_ENGINE=echo: it
answers at once and uses no device), on a scratch database and Redis database 11 of the
local server; each request goes the whole way (key, quota and slot, enqueue through Celery,
the worker, its usage record, the stream back). LiteLLM: its proxy (`litellm --config`) with
a `mock_response` model and its master key (no database, so no virtual keys: its key check is
a string comparison). Both get the same OpenAI-style chat completions from one asyncio client
on the same machine, one at a time and 32 at once. Round-trip latency is what is added: the
engines take no time. Prints one JSON line per server and concurrency.
"""

import argparse
import asyncio
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis
from sqlalchemy import text

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import migrations  # noqa: E402
from billing import tenants  # noqa: E402
from billing.db import session_factory, sync_engine, transaction  # noqa: E402
from tests.conftest import SERVICES, drop_database, fresh_database  # noqa: E402
from tests.stack import Gateway, Process, free_port, wait_for  # noqa: E402

BODY = {
    "model": "llava-llama3",
    "messages": [{"role": "user", "content": "hello there general kenobi"}],
    "max_tokens": 4,
}


async def load(url: str, keys: list[str], requests: int, concurrency: int) -> dict:
    latencies: list[float] = []
    failures = 0
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(requests):
        queue.put_nowait(i)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:

        async def one_client(index: int) -> None:
            nonlocal failures
            headers = {"Authorization": f"Bearer {keys[index % len(keys)]}"}
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
        await asyncio.gather(*(one_client(i) for i in range(concurrency)))
        wall = time.perf_counter() - started
    latencies.sort()
    return {
        "concurrency": concurrency,
        "requests": requests,
        "failed": failures,
        "p50_ms": round(statistics.median(latencies), 2),
        "p99_ms": round(latencies[int(len(latencies) * 0.99) - 1], 2),
        "requests_per_second": round(len(latencies) / wall, 1),
    }


def stages(sessions, since: datetime) -> dict:
    """Where a request's time went, from its usage record (medians, ms): from the gateway's
    enqueue to the worker's start (the Celery hop), and on the worker up to its record."""
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


def run_gpuhost(requests: int) -> list[dict]:
    name = f"gpuhost_bench_gw_{uuid.uuid4().hex[:8]}"
    url = fresh_database(name)
    redis_url = f"redis://{SERVICES.redis_host}:{SERVICES.redis_port}/11"
    redis.Redis.from_url(redis_url).flushdb()
    logs = Path(tempfile.mkdtemp())
    processes = []
    try:
        migrations.upgrade(url)
        sessions = session_factory(sync_engine(url))
        keys = []
        with transaction(sessions) as session:
            for i in range(8):  # Max: 10 in flight each, 80 in all
                tenant = tenants.create_tenant(session, f"bench-{i}", "max", {"max": 10})
                keys.append(tenants.create_key(session, tenant.id)[1])
        env = {"GPUHOST_DATABASE_URL": url, "GPUHOST_REDIS_URL": redis_url}
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
                    endpoint, json=BODY, headers={"Authorization": f"Bearer {keys[0]}"}, timeout=10
                ).status_code
                == 200
            ),
            60,
            "the echo worker",
        )
        asyncio.run(load(endpoint, keys, 100, 8))  # warm
        results = []
        for c in (1, 32):
            since = datetime.now(UTC)
            result = asyncio.run(load(endpoint, keys, requests * c // 8 or requests, c))
            results.append({"server": "gpuhost"} | result | stages(sessions, since))
        return results
    finally:
        for process in processes:
            process.stop()
        redis.Redis.from_url(redis_url).flushdb()
        drop_database(name)


def run_litellm(executable: str, requests: int) -> list[dict]:
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
        keys = ["sk-bench-master"]
        asyncio.run(load(endpoint, keys, 100, 8))  # warm
        return [
            {"server": "litellm-proxy"}
            | asyncio.run(load(endpoint, keys, requests * c // 8 or requests, c))
            for c in (1, 32)
        ]
    finally:
        server.terminate()
        server.wait(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=400, help="at concurrency 8; scaled")
    parser.add_argument("--litellm", default=shutil.which("litellm"), help="litellm executable")
    args = parser.parse_args()
    rows = run_gpuhost(args.requests)
    if args.litellm:
        rows += run_litellm(args.litellm, args.requests)
    else:
        print(json.dumps({"litellm": "not installed: pip install 'litellm[proxy]'"}))
    for row in rows:
        print(json.dumps(row), flush=True)


if __name__ == "__main__":
    main()
