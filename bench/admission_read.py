"""What the admission check's ledger read costs for a tenant with many records this month:
the monthly total it reads now (one row of usage_totals) against the sum over the month's
usage records it ran before (migration 0010).

    python bench/admission_read.py [--records 200000] [--reads 200]

Needs PostgreSQL (GPUHOST_TEST_POSTGRES_URL, default the local server); makes and drops a
scratch database. Prints milliseconds per read (median) for each, and that both agree.
"""

import argparse
import asyncio
import json
import statistics
import sys
import time
import uuid
from datetime import UTC, datetime
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from sqlalchemy import func, select  # noqa: E402

import migrations  # noqa: E402
from billing import tenants, usage  # noqa: E402
from billing.db import (  # noqa: E402
    async_engine,
    async_session_factory,
    session_factory,
    sync_engine,
    transaction,
)
from billing.models import UsageRecord  # noqa: E402
from billing.plans import period_of  # noqa: E402
from harness.helpers import usage_create  # noqa: E402
from harness.services import drop_database, fresh_database  # noqa: E402


def fill(sessions, tenant_id, records: int, when: datetime) -> None:
    batch = 5000
    for start in range(0, records, batch):
        with transaction(sessions) as session:
            usage.record_many(
                session,
                [
                    usage_create(
                        tenant_id, 0.731, finished_at=when, prompt_tokens=600, output_tokens=128
                    )
                    for _ in range(min(batch, records - start))
                ],
            )


async def timed(reads: int, read) -> tuple[float, float]:
    """Median milliseconds per read, and the value read."""
    times, value = [], None
    for _ in range(reads):
        started = time.perf_counter()
        value = await read()
        times.append((time.perf_counter() - started) * 1000)
    return statistics.median(times), value


async def measure(url: str, tenant_id, reads: int) -> dict:
    engine = async_engine(url)
    sessions = async_session_factory(engine)
    period = period_of(datetime.now(UTC))

    async def total():
        async with sessions() as session:
            return (await usage.admission_view(session, tenant_id, period))[1]

    async def summed():  # the read before migration 0010
        async with sessions() as session:
            return await session.scalar(
                select(func.coalesce(func.sum(UsageRecord.gpu_seconds), 0.0)).where(
                    UsageRecord.tenant_id == tenant_id,
                    UsageRecord.finished_at >= period.start,
                    UsageRecord.finished_at < period.end,
                )
            )

    try:
        now_ms, now_value = await timed(reads, total)
        before_ms, before_value = await timed(reads, summed)
    finally:
        await engine.dispose()
    return {
        "monthly_total_ms": round(now_ms, 3),
        "sum_of_records_ms": round(before_ms, 3),
        "agree": abs(now_value - before_value) <= 1e-9 * max(1.0, before_value),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--reads", type=int, default=200)
    args = parser.parse_args()
    name = f"gpuhost_bench_{uuid.uuid4().hex[:8]}"
    url = fresh_database(name)
    engine = sync_engine(url)
    try:
        migrations.upgrade(url)
        sessions = session_factory(engine)
        with transaction(sessions) as session:
            tenant_id = tenants.create_tenant(session, "heavy", "max", {"max": 10}).id
        fill(sessions, tenant_id, args.records, datetime.now(UTC))
        result = asyncio.run(measure(url, tenant_id, args.reads))
        print(json.dumps({"records_this_month": args.records, **result}))
    finally:
        engine.dispose()
        drop_database(name)


if __name__ == "__main__":
    main()
