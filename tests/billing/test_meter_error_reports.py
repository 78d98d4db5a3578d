"""Stripe's meter error reports: meter events Stripe takes (2xx) and then cannot count (here:
for a customer it does not know) come back in a report sent to the gateway's event
destination; the relay fetches it, flags the rows it names, and reconcile names them."""

import json
import os
import subprocess
import sys
import uuid

import httpx
import pytest
from sqlalchemy import select

from billing import stripe_meter, tenants
from billing.db import transaction
from billing.models import MeterErrorReport, OutboxEvent, Tenant
from billing.relay import Relay
from billing.settings import StripeSettings
from harness.helpers import record_usage
from tests.billing.conftest import relay_settings
from tests.billing.test_stripe_relay import TIERS, tenant_with_usage
from tests.conftest import EVENTS_SECRET


@pytest.fixture
def settings(fake, database_url) -> StripeSettings:
    return relay_settings(
        fake,
        database_url,
        stripe_timeout_seconds=5.0,
        stripe_meter_id="mtr_gpu_seconds",
        stripe_subscriptions=False,
    )


def gone_customer_with_usage(sessions, seconds: list[float]) -> tuple[uuid.UUID, str]:
    """A tenant whose Stripe customer was deleted in Stripe's dashboard: its id is one
    Stripe no longer knows."""
    with transaction(sessions) as session:
        tenant = tenants.create_tenant(session, f"t-{uuid.uuid4().hex[:6]}", "pro", TIERS)
        tenant.stripe_customer_id = f"cus_deleted{uuid.uuid4().hex[:10]}"
        tenant_id, customer = tenant.id, tenant.stripe_customer_id
        for value in seconds:
            record_usage(session, tenant_id, value, uuid.uuid4().hex)
    return tenant_id, customer


def outbox(sessions, tenant_id) -> list[OutboxEvent]:
    with sessions() as session:
        return session.scalars(select(OutboxEvent).where(OutboxEvent.tenant_id == tenant_id)).all()


def test_uncounted_events_are_flagged_and_named_by_reconcile(
    gateway, fake, settings, sessions, database_url
):
    api = stripe_meter.client(settings)
    customer, _ = tenant_with_usage(sessions, api, [1.0, 0.5])
    gone_id, gone = gone_customer_with_usage(sessions, [2.0, 0.25])
    relay = Relay(settings, sessions, api)
    first = relay.run_pass()
    # Stripe took all four (2xx): every row is sent, two of them are not counted
    assert first.failed == 0 and first.rejected == 0
    assert all(row.sent_at is not None for row in outbox(sessions, gone_id))
    assert fake.total(customer) == 1500 and fake.total(gone) == 0

    answer = fake.report_meter_errors(f"{gateway.url}/billing/stripe/events", EVENTS_SECRET)
    assert answer.status_code == 200, answer.text
    assert answer.json() == {"received": True, "recorded": True}
    with sessions() as session:
        report = session.scalars(
            select(MeterErrorReport).where(MeterErrorReport.fetched_at.is_(None))
        ).one()

    second = relay.run_pass()
    assert second.rejected == 2
    assert relay.metrics.rejected._value.get() == 2
    flagged = outbox(sessions, gone_id)
    assert all(row.stripe_error.startswith("meter_event_customer_not_found: ") for row in flagged)
    assert all(row.stripe_error_at is not None for row in flagged)
    with sessions() as session:
        fetched = session.get(MeterErrorReport, report.id)
        assert fetched.fetched_at is not None and fetched.error_count == 2
    assert relay.run_pass().rejected == 0  # a report is fetched once

    env = os.environ | {
        "GPUHOST_DATABASE_URL": database_url,
        "GPUHOST_STRIPE_API_KEY": "sk_test_cli",
        "GPUHOST_STRIPE_API_BASE": fake.url,
        "GPUHOST_STRIPE_METER_ID": "mtr_gpu_seconds",
    }
    done = subprocess.run(
        [sys.executable, "-m", "cli", "billing", "reconcile", "--customer", gone],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1, done.stderr  # money Stripe did not count: the operator acts
    found = json.loads(done.stdout)
    [row] = found["customers"]
    assert row["ledger_milli"] == 2250 and row["rejected_milli"] == 2250
    assert row["stripe_milli"] == 0 and row["unexplained_milli"] == 0
    named = {r["identifier"] for r in found["rejected_by_stripe"]}
    assert named == {str(r.usage_record_id) for r in flagged}

    # the counted customer's rows are not flagged
    with sessions() as session:
        counted = session.scalar(select(Tenant.id).where(Tenant.stripe_customer_id == customer))
    assert all(row.stripe_error is None for row in outbox(sessions, counted))


def test_a_thin_event_with_a_bad_signature_is_refused(gateway):
    body = json.dumps({"id": "evt_x", "type": "v1.billing.meter.error_report_triggered"})
    answer = httpx.post(
        f"{gateway.url}/billing/stripe/events",
        content=body,
        headers={"Stripe-Signature": "t=1,v1=00", "Content-Type": "application/json"},
        timeout=30,
    )
    assert answer.status_code == 400
    assert "invalid Stripe signature" in answer.json()["error"]
