"""GPU-seconds reach Stripe exactly once, through the outbox relay and the official SDK,
against a Stripe-compatible server on 127.0.0.1 (tests/stripe_server.py)."""

import threading
import uuid
from datetime import UTC, datetime

import httpx
import pytest
from sqlalchemy import select

from billing import stripe_meter, tenants
from billing.db import transaction
from billing.models import OutboxEvent, Tenant
from billing.settings import StripeSettings
from harness.helpers import record_usage
from harness.processes import Process, free_port, wait_for
from tests.billing.conftest import relay_settings

TIERS = {"free": 1, "pro": 3, "max": 10}


@pytest.fixture
def settings(fake, database_url) -> StripeSettings:
    return relay_settings(fake, database_url)


@pytest.fixture
def api(settings):
    return stripe_meter.client(settings)


def tenant_with_usage(sessions, api, seconds: list[float]) -> tuple[str, list[str]]:
    """A tenant with a Stripe customer and usage records; returns (customer id, record ids)."""
    with transaction(sessions) as session:
        tenant = tenants.create_tenant(session, f"t-{uuid.uuid4().hex[:6]}", "pro", TIERS)
        tenant_id = tenant.id
    stripe_meter.ensure_customers(sessions, api)
    request_ids = []
    with transaction(sessions) as session:
        for value in seconds:
            request_ids.append(uuid.uuid4().hex)
            record_usage(session, tenant_id, value, request_ids[-1])
        customer = session.get(Tenant, tenant_id).stripe_customer_id
    return customer, request_ids


def unsent(sessions, customer: str) -> int:
    with sessions() as session:
        return len(
            session.scalars(
                select(OutboxEvent)
                .join(Tenant, Tenant.id == OutboxEvent.tenant_id)
                .where(Tenant.stripe_customer_id == customer, OutboxEvent.sent_at.is_(None))
            ).all()
        )


class TestRelay:
    def test_each_record_is_sent_once_in_milli_gpu_seconds(self, sessions, api, settings, fake):
        customer, _ = tenant_with_usage(sessions, api, [1.5, 0.25, 2.0004])
        first = stripe_meter.relay_once(sessions, api, settings)
        assert first.sent >= 3 and first.failed == 0
        assert fake.total(customer) == 1500 + 250 + 2000
        assert unsent(sessions, customer) == 0
        again = stripe_meter.relay_once(sessions, api, settings)
        assert again.sent == 0 and fake.total(customer) == 3750

    def test_a_relay_that_dies_after_stripes_2xx_does_not_double(
        self, sessions, api, settings, fake
    ):
        customer, _ = tenant_with_usage(sessions, api, [3.0, 4.0])

        def die(_row):
            raise SystemExit("relay killed between Stripe's 2xx and its commit")

        with pytest.raises(SystemExit):
            stripe_meter.relay_once(sessions, api, settings, after_send=die)
        assert unsent(sessions, customer) == 2  # nothing was committed
        taken = fake.total(customer)
        assert taken in (3000, 4000)  # Stripe took the first one sent
        stripe_meter.relay_once(sessions, api, settings)  # the relay restarts
        assert unsent(sessions, customer) == 0
        assert fake.total(customer) == 7000  # the first one was not counted twice

    def test_an_event_stripe_already_holds_is_delivered_not_retried(
        self, sessions, api, settings, fake
    ):
        """Rows sent again after Stripe's 24-hour idempotency window (a relay down for a day,
        a restored database): Stripe refuses the identifier it has (400, not to be retried);
        the relay counts that as delivered, and the meter counts the event once."""
        customer, _ = tenant_with_usage(sessions, api, [1.25])
        assert stripe_meter.relay_once(sessions, api, settings).sent >= 1
        with transaction(sessions) as session:  # the restore: the row is unsent again
            [row] = session.scalars(
                select(OutboxEvent)
                .join(Tenant, Tenant.id == OutboxEvent.tenant_id)
                .where(Tenant.stripe_customer_id == customer)
            ).all()
            row.sent_at = None
        fake.forget_idempotency_keys()  # a day later
        again = stripe_meter.relay_once(sessions, api, settings)
        assert again.failed == 0 and again.already_delivered == 1
        assert unsent(sessions, customer) == 0
        assert fake.total(customer) == 1250  # counted once
        [identifier] = [
            i for i, e in fake.events.items() if e["payload"]["stripe_customer_id"] == customer
        ]
        assert fake.posts[identifier] == 2  # posted twice, refused the second time
        with sessions() as session:
            assert session.get(OutboxEvent, row.id).last_error is None

    def test_stripe_errors_and_timeouts_lose_nothing(self, sessions, api, settings, fake):
        customer, request_ids = tenant_with_usage(sessions, api, [1.0, 2.0, 3.0])
        fake.fail_next(2, 500)
        fake.slow_next(1, 2.0)  # answers after the relay has given up, but records the event
        broken = stripe_meter.relay_once(sessions, api, settings)
        assert broken.failed == 3
        assert unsent(sessions, customer) == 3
        with sessions() as session:
            rows = session.scalars(
                select(OutboxEvent)
                .where(OutboxEvent.sent_at.is_(None))
                .where(OutboxEvent.last_error.is_not(None))
            ).all()
            assert rows and all(r.attempts >= 1 for r in rows)
        recovered = stripe_meter.relay_once(sessions, api, settings)
        assert recovered.failed == 0
        assert unsent(sessions, customer) == 0
        assert fake.total(customer) == 6000

    def test_a_failed_row_backs_off_before_its_next_attempt(self, sessions, api, settings, fake):
        from datetime import timedelta

        from sqlalchemy import update

        patient = settings.model_copy(update={"relay_backoff_base_seconds": 60})
        customer, _ = tenant_with_usage(sessions, api, [])
        while stripe_meter.relay_once(sessions, api, settings).sent:  # nothing else is due
            pass
        with transaction(sessions) as session:
            tenant_id = session.scalars(
                select(Tenant.id).where(Tenant.stripe_customer_id == customer)
            ).one()
            record_usage(session, tenant_id, 1.0)
        fake.fail_next(1, 500)
        assert stripe_meter.relay_once(sessions, api, patient).failed == 1
        assert stripe_meter.relay_once(sessions, api, patient).sent == 0  # still backing off
        with sessions() as session:
            [row] = session.scalars(
                select(OutboxEvent)
                .join(Tenant, Tenant.id == OutboxEvent.tenant_id)
                .where(Tenant.stripe_customer_id == customer)
            ).all()
            wait = row.retry_after - datetime.now(UTC)
        assert timedelta(seconds=50) < wait <= timedelta(seconds=60)
        with transaction(sessions) as session:  # the minute passes
            session.execute(
                update(OutboxEvent)
                .where(OutboxEvent.id == row.id)
                .values(retry_after=datetime.now(UTC) - timedelta(seconds=1))
            )
        assert stripe_meter.relay_once(sessions, api, patient).sent >= 1
        assert fake.total(customer) == 1000 and unsent(sessions, customer) == 0

    def test_concurrent_relays_never_send_a_row_twice(self, sessions, api, settings, fake):
        customer, _ = tenant_with_usage(sessions, api, [0.1] * 40)
        before = dict(fake.posts)
        relays = [
            threading.Thread(
                target=stripe_meter.relay_once,
                args=(sessions, stripe_meter.client(settings), settings),
            )
            for _ in range(4)
        ]
        for relay in relays:
            relay.start()
        for relay in relays:
            relay.join()
        posted = {k: v - before.get(k, 0) for k, v in fake.posts.items() if v - before.get(k, 0)}
        assert sorted(posted.values()) == [1] * 40
        assert fake.total(customer) == 4000 and unsent(sessions, customer) == 0

    def test_rows_of_tenants_without_a_customer_wait(self, sessions, api, settings):
        with transaction(sessions) as session:
            tenant = tenants.create_tenant(session, "no-customer-yet", "pro", TIERS)
            record_usage(session, tenant.id, 1.0)
        assert stripe_meter.relay_once(sessions, api, settings).waiting_for_customer >= 1


class TestCommandLine:
    def test_customers_then_one_relay_pass(self, sessions, settings, fake, database_url):
        import json
        import os
        import subprocess
        import sys

        with transaction(sessions) as session:
            tenant = tenants.create_tenant(session, "cli-billing", "pro", TIERS)
            record_usage(session, tenant.id, 2.5)
            tenant_id = tenant.id
        env = os.environ | {
            "GPUHOST_DATABASE_URL": database_url,
            "GPUHOST_STRIPE_API_KEY": "sk_test_cli",
            "GPUHOST_STRIPE_API_BASE": fake.url,
        }

        def gpuhost(*args):
            done = subprocess.run(
                [sys.executable, "-m", "cli", *args],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.returncode == 0, done.stderr
            return json.loads(done.stdout)

        assert gpuhost("billing", "customers")["created"] >= 1
        assert gpuhost("billing", "relay", "--once")["failed"] == 0
        with sessions() as session:
            customer = session.get(Tenant, tenant_id).stripe_customer_id
        assert fake.total(customer) == 2500

    def test_the_beat_worker_subscribes_tenants_and_relays_usage(
        self, sessions, fake, database_url, redis_url, tmp_path
    ):
        with transaction(sessions) as session:
            tenant = tenants.create_tenant(session, "beat-billing", "pro", TIERS)
            record_usage(session, tenant.id, 1.5)
            tenant_id = tenant.id
        metrics_port = free_port()
        env = {
            "GPUHOST_DATABASE_URL": database_url,
            "GPUHOST_REDIS_URL": redis_url,
            "GPUHOST_STRIPE_API_KEY": "sk_test_beat",
            "GPUHOST_STRIPE_API_BASE": fake.url,
            "GPUHOST_RELAY_INTERVAL_SECONDS": "1",
            "GPUHOST_RELAY_BEAT_SCHEDULE_FILE": str(tmp_path / "beat" / "schedule"),
            "GPUHOST_RELAY_METRICS_PORT": str(metrics_port),
        }
        worker = Process("billing-worker", ["billing", "worker"], env, tmp_path)

        def relayed() -> bool:
            assert worker.alive(), worker.tail()
            with sessions() as session:
                row = session.get(Tenant, tenant_id)
            return (
                row.stripe_subscription_id is not None
                and fake.total(row.stripe_customer_id) == 1500
            )

        def sent_metric() -> float:
            scraped = httpx.get(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).text
            line = next(
                x for x in scraped.splitlines() if x.startswith("gpuhost_relay_events_sent_total")
            )
            return float(line.split()[-1])

        try:
            wait_for(relayed, 90, "the beat worker's relay passes")
            # the pass counts what it sent once it ends
            wait_for(lambda: sent_metric() >= 1, 30, "the relay's metrics to count the event")
        finally:
            worker.stop()
        assert worker.popen.returncode == 0, worker.tail()
        with sessions() as session:
            row = session.get(Tenant, tenant_id)
        items = fake.subscriptions[row.stripe_subscription_id]["items"]["data"]
        assert {i["price"]["lookup_key"] for i in items} == {"pro", "pro_gpu_seconds"}


class TestReconcile:
    def test_zero_after_a_mixed_run_and_non_zero_after_tampering(
        self, sessions, settings, fake, database_url
    ):
        import json
        import os
        import subprocess
        import sys

        from sqlalchemy import update

        from billing.models import UsageRecord

        settings = settings.model_copy(update={"stripe_meter_id": "mtr_gpu_seconds"})
        api = stripe_meter.client(settings)
        customer, request_ids = tenant_with_usage(sessions, api, [1.0, 2.5, 0.125, 4.0])
        fake.fail_next(1, 500)
        stripe_meter.relay_once(sessions, api, settings)  # one fails: pending, not a difference
        env = os.environ | {
            "GPUHOST_DATABASE_URL": database_url,
            "GPUHOST_STRIPE_API_KEY": "sk_test_cli",
            "GPUHOST_STRIPE_API_BASE": fake.url,
            "GPUHOST_STRIPE_METER_ID": "mtr_gpu_seconds",
        }

        def reconcile() -> tuple[int, dict]:
            done = subprocess.run(
                [sys.executable, "-m", "cli", "billing", "reconcile", "--customer", customer],
                env=env,
                capture_output=True,
                text=True,
                timeout=120,
            )
            assert done.stdout, done.stderr
            [row] = json.loads(done.stdout)["customers"]
            return done.returncode, row

        code, row = reconcile()
        assert code == 0, row
        assert row["ledger_milli"] == 7625 and row["unexplained_milli"] == 0
        assert row["pending_milli"] > 0
        stripe_meter.relay_once(sessions, api, settings)
        code, row = reconcile()
        assert code == 0 and row["pending_milli"] == 0 and row["stripe_milli"] == 7625

        with transaction(sessions) as session:  # someone edits the ledger behind billing's back
            session.execute(
                update(UsageRecord)
                .where(UsageRecord.request_id == request_ids[0])
                .values(gpu_seconds=9.0)
            )
        code, row = reconcile()
        assert code == 1
        assert row["unexplained_milli"] == 8000


class TestAggregation:
    @pytest.fixture
    def hourly(self, settings):
        return settings.model_copy(
            update={"relay_aggregate_seconds": 3600, "relay_aggregate_grace_seconds": 0}
        )

    def usage_in_windows(self, sessions, api, hours_ago: list[float]) -> str:
        from datetime import timedelta

        customer, _ = tenant_with_usage(sessions, api, [])
        with sessions() as session:
            tenant_id = session.scalars(
                select(Tenant.id).where(Tenant.stripe_customer_id == customer)
            ).one()
        now = datetime.now(UTC)
        with transaction(sessions) as session:
            for hours in hours_ago:
                record_usage(session, tenant_id, 0.5, finished_at=now - timedelta(hours=hours))
        return customer

    def test_one_event_per_tenant_per_closed_window(self, sessions, api, hourly, fake):
        customer = self.usage_in_windows(sessions, api, [3.1] * 30 + [5.1] * 20 + [0.0] * 5)
        posts = sum(fake.posts.values())
        stripe_meter.relay_once(sessions, api, hourly)
        # Two closed hours, two events; the current hour waits until it closes.
        assert sum(fake.posts.values()) - posts == 2
        assert fake.total(customer) == 50 * 500
        assert unsent(sessions, customer) == 5

    def test_a_crash_after_the_2xx_resends_the_same_batch(self, sessions, api, hourly, fake):
        customer = self.usage_in_windows(sessions, api, [2.2] * 10)

        def die(_event):
            raise SystemExit("relay killed between Stripe's 2xx and its commit")

        with pytest.raises(SystemExit):
            stripe_meter.relay_once(sessions, api, hourly, after_send=die)
        assert unsent(sessions, customer) == 10  # nothing was marked sent
        assert fake.total(customer) == 10 * 500  # but Stripe has the batch
        stripe_meter.relay_once(sessions, api, hourly)  # the relay restarts
        assert fake.total(customer) == 10 * 500  # counted once
        assert unsent(sessions, customer) == 0
