"""Billing throughput: usage records ingested per second into PostgreSQL (each with its outbox
row, as workers write them), and relayed per second to a Stripe-compatible server.

    python bench/billing.py [--records 20000] [--writers 64] [--processes 1]
                            [--aggregate 3600] [--no-group-commit] [--tenants N]
                            [--schema REVISION]

Needs PostgreSQL (GPUHOST_TEST_POSTGRES_URL, default the local server); makes and drops a
scratch database. Without --aggregate the relay sends one meter event per record (100 Stripe
calls per 100 records); with it, one per tenant per window. Records go in through the
workers' group-committing `UsageWriter` unless --no-group-commit. --processes N splits the
writer threads over N processes, each with its own `UsageWriter`, as N worker processes
(one per GPU) write their usage in a deployment; the rate is all of them together.
--tenants N spreads the records over N tenants (default: one per writer thread; 1: every
record adds to the same monthly total). --schema migrates the scratch database only so far
(0009: before the monthly totals and their trigger) to measure what a migration costs.
"""

import argparse
import json
import multiprocessing
import sys
import threading
import time
import uuid
from datetime import UTC, datetime, timedelta
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import migrations  # noqa: E402
from billing import stripe_meter, tenants, usage  # noqa: E402
from billing.db import session_factory, sync_engine, transaction  # noqa: E402
from billing.settings import StripeSettings  # noqa: E402
from billing.usage_writer import UsageWriter  # noqa: E402
from harness.helpers import usage_create  # noqa: E402
from harness.services import drop_database, fresh_database  # noqa: E402
from harness.stripe_server import FakeStripe  # noqa: E402


def ingest(record, tenant_ids: list, records: int, writers: int, when: datetime) -> float:
    """`writers` threads, each finishing requests back to back: records written per second."""
    per_writer = records // writers

    def write(index: int) -> None:
        tenant_id = tenant_ids[index % len(tenant_ids)]
        for _ in range(per_writer):
            record(
                usage_create(
                    tenant_id, 0.731, finished_at=when, prompt_tokens=600, output_tokens=128
                )
            )

    threads = [threading.Thread(target=write, args=(i,)) for i in range(writers)]
    started = time.perf_counter()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return per_writer * writers / (time.perf_counter() - started)


def _process(url, tenant_ids, records, writers, when, ready, go, done) -> None:
    """One worker process: its own connections and writer, started with the others."""
    engine = sync_engine(url)
    writer = UsageWriter(session_factory(engine))
    ready.wait()
    go.wait()
    ingest(writer.record, tenant_ids, records, writers, when)
    writer.close()
    done.put(writer.commits)
    engine.dispose()


def ingest_processes(url, tenant_ids, records, writers, processes, when) -> tuple[float, int]:
    """Records per second and commits, over `processes` processes writing at once."""
    context = multiprocessing.get_context("spawn")
    ready, go, done = context.Barrier(processes + 1), context.Event(), context.Queue()
    children = [
        context.Process(
            target=_process,
            args=(
                url,
                tenant_ids[i::processes] or tenant_ids,  # fewer tenants: all share them
                records // processes,
                writers // processes,
                when,
                ready,
                go,
                done,
            ),
        )
        for i in range(processes)
    ]
    for child in children:
        child.start()
    ready.wait()  # every process connected and waiting
    started = time.perf_counter()
    go.set()
    commits = sum(done.get() for _ in children)
    elapsed = time.perf_counter() - started
    for child in children:
        child.join()
    return records / elapsed, commits


def one_transaction_each(sessions):
    def record(item: usage.UsageCreate) -> None:
        with transaction(sessions) as session:
            usage.record(session, item)

    return record


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--records", type=int, default=20000)
    parser.add_argument("--writers", type=int, default=64)
    parser.add_argument("--processes", type=int, default=1, help="writer processes")
    parser.add_argument(
        "--aggregate",
        type=int,
        default=0,
        help="relay aggregation window in seconds (0: one event per record)",
    )
    parser.add_argument("--tenants", type=int, help="tenants (default: one per writer)")
    parser.add_argument("--schema", default="head", help="migrate the scratch database to this")
    parser.add_argument(
        "--no-group-commit",
        dest="group_commit",
        action="store_false",
        help="one transaction per record (as before group commits)",
    )
    args = parser.parse_args()
    args.writers -= args.writers % args.processes
    args.records -= args.records % args.writers  # each writer writes as many
    name = f"gpuhost_bench_{uuid.uuid4().hex[:8]}"
    url = fresh_database(name)
    fake = FakeStripe().start()
    engine = sync_engine(url)
    try:
        migrations.upgrade(url, args.schema)
        sessions = session_factory(engine)
        with transaction(sessions) as session:
            ids = [
                tenants.create_tenant(session, f"bench-{i}", "pro", {"pro": 3}).id
                for i in range(args.tenants or args.writers)
            ]
        # Usage from two hours ago, so that aggregation windows are closed when relayed.
        when = datetime.now(UTC) - timedelta(hours=2)
        if args.group_commit and args.processes > 1:
            rate, commits = ingest_processes(
                url, ids, args.records, args.writers, args.processes, when
            )
        elif args.group_commit:
            writer = UsageWriter(sessions)
            rate = ingest(writer.record, ids, args.records, args.writers, when)
            writer.close()
            commits = writer.commits
        else:
            rate = ingest(one_transaction_each(sessions), ids, args.records, args.writers, when)
            commits = args.records
        settings = StripeSettings(
            database_url=url,
            stripe_api_key="sk_test_bench",
            stripe_api_base=fake.url,
            relay_batch_size=500,
            relay_aggregate_seconds=args.aggregate,
        )
        api = stripe_meter.client(settings)
        stripe_meter.ensure_customers(sessions, api)
        started = time.perf_counter()
        while stripe_meter.relay_once(sessions, api, settings).sent:
            pass
        relayed = args.records / (time.perf_counter() - started)
        calls = sum(fake.posts.values())
        print(
            json.dumps(
                {
                    "records": args.records,
                    "writers": args.writers,
                    "processes": args.processes,
                    "tenants": len(ids),
                    "schema": args.schema,
                    "ingest_commits": commits,
                    "aggregate_seconds": args.aggregate,
                    "ingested_per_second": round(rate),
                    "records_relayed_per_second": round(relayed),
                    "stripe_calls_per_100_records": round(100 * calls / args.records, 2),
                }
            )
        )
    finally:
        engine.dispose()
        fake.stop()
        drop_database(name)


if __name__ == "__main__":
    main()
