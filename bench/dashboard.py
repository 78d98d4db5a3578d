"""Dashboard page times on seeded demo data: every request should answer within 200 ms.

    python bench/dashboard.py [--tenants 20] [--records 50000] [--rounds 20]

Makes a scratch database (GPUHOST_TEST_POSTGRES_URL, default the local server) with
`--tenants` tenants and `--records` usage records spread over the last 30 days, starts a
gateway on it (Redis database 12 of the local server, flushed before and after), signs in as
the busiest tenant and as the operator, and times each page `--rounds` times over one
keep-alive connection. Prints one JSON line per page: p50, p99 and max milliseconds.
"""

import argparse
import json
import random
import statistics
import sys
import tempfile
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.scratch import scratch_stack  # noqa: E402
from billing import tenants, usage  # noqa: E402
from billing.db import session_factory, sync_engine, transaction  # noqa: E402
from harness.helpers import dashboard_sign_in  # noqa: E402
from harness.processes import Gateway  # noqa: E402

ADMIN = "adm_bench_dashboard_4c1e9a7f03b65d28"
MODELS = [("llava-llama3", "chat"), ("stable-diffusion", "txt2img")]


def seed(url: str, count: int, records: int) -> str:
    """Tenants and usage; returns the busiest tenant's key."""
    sessions = session_factory(sync_engine(url))
    tiers = {"free": 1, "pro": 3, "max": 10}
    with transaction(sessions) as session:
        ids = [
            tenants.create_tenant(session, f"demo-{i}", random.choice(list(tiers)), tiers).id
            for i in range(count)
        ]
        _, key = tenants.create_key(session, ids[0])
    now = datetime.now(UTC)
    rng = random.Random(7)
    batch = []
    for i in range(records):
        model, kind = rng.choice(MODELS)
        batch.append(
            usage.UsageCreate(
                request_id=uuid.uuid4().hex,
                tenant_id=ids[0] if i % 4 == 0 else rng.choice(ids),  # a quarter for one tenant
                api_key_id=None,
                model=model,
                kind=kind,
                status="completed",
                gpu_seconds=round(rng.uniform(0.05, 3.0), 3),
                queue_seconds=0.01,
                prompt_tokens=600,
                output_tokens=rng.randint(1, 300),
                started_at=None,
                finished_at=now - timedelta(seconds=rng.uniform(0, 30 * 86400)),
            )
        )
        if len(batch) == 2000:
            with transaction(sessions) as session:
                usage.record_many(session, batch)
            batch = []
    if batch:
        with transaction(sessions) as session:
            usage.record_many(session, batch)
    return key


def timed(client: httpx.Client, path: str, rounds: int) -> dict:
    client.get(path)  # warm
    times = []
    for _ in range(rounds):
        started = time.perf_counter()
        response = client.get(path)
        times.append((time.perf_counter() - started) * 1000)
        assert response.status_code == 200, (path, response.status_code)
    times.sort()
    return {
        "page": path,
        "p50_ms": round(statistics.median(times), 1),
        "p99_ms": round(times[min(len(times) - 1, int(len(times) * 0.99))], 1),
        "max_ms": round(times[-1], 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tenants", type=int, default=20)
    parser.add_argument("--records", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=20)
    args = parser.parse_args()
    pages = (
        (
            None,  # the seeded tenant's key
            [
                "/dashboard/usage?range=24h",
                "/dashboard/usage?range=30d",
                "/dashboard/usage?range=30d&model=stable-diffusion&page=20",
                "/dashboard/keys",
            ],
        ),
        (ADMIN, ["/dashboard/admin"]),
    )
    with scratch_stack("dash", 12) as (url, redis_url):
        key = seed(url, args.tenants, args.records)
        env = {
            "GPUHOST_DATABASE_URL": url,
            "GPUHOST_REDIS_URL": redis_url,
            "GPUHOST_ADMIN_TOKEN": ADMIN,
        }
        gateway = Gateway("gateway-bench", env, Path(tempfile.mkdtemp()))
        try:
            gateway.wait_ready()
            for credential, paths in pages:
                with httpx.Client(base_url=gateway.url, timeout=30) as client:
                    signed = dashboard_sign_in(client, credential or key)
                    assert signed.status_code == 303, signed.text
                    for path in paths:
                        print(json.dumps(timed(client, path, args.rounds)), flush=True)
        finally:
            gateway.stop()


if __name__ == "__main__":
    main()
