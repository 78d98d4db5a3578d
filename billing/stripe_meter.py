"""GPU-seconds to Stripe, exactly once: the outbox relay.

Every billable usage record has an outbox row, written in the record's own transaction. The
relay takes unsent rows (`FOR UPDATE SKIP LOCKED`, so concurrent relays never take the same
row), sends each as a Billing Meter event in integer milli-GPU-seconds, with
`identifier` = the usage record id and the same value as idempotency key, and marks it sent
only after Stripe's 2xx, in the same transaction that locked it. A relay that dies after
Stripe's 2xx but before its commit leaves the row unsent: the next relay sends it again, and
Stripe keeps one event (same identifier, same idempotency key). Failures are counted on the
row and retried on a later pass; nothing is dropped.

This module is the only one that imports the `stripe` SDK.
"""

import logging
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import stripe
from sqlalchemy import func, select
from sqlalchemy.orm import Session, sessionmaker

from billing.db import transaction
from billing.models import OutboxEvent, Tenant, UsageRecord
from billing.settings import StripeSettings

log = logging.getLogger(__name__)


def client(settings: StripeSettings) -> stripe.StripeClient:
    if not settings.stripe_api_key:
        raise RuntimeError("Stripe is not configured: set GPUHOST_STRIPE_API_KEY")
    options: dict = {
        "max_network_retries": 0,  # the relay retries on its next pass, row by row
        "http_client": stripe.HTTPXClient(
            timeout=settings.stripe_timeout_seconds, allow_sync_methods=True
        ),
    }
    if settings.stripe_api_base:
        options["base_addresses"] = {"api": settings.stripe_api_base}
    return stripe.StripeClient(settings.stripe_api_key, **options)


@dataclass(frozen=True)
class Pass:
    """What one relay pass did."""

    sent: int
    failed: int
    waiting_for_customer: int


def ensure_customers(sessions: sessionmaker[Session], api: stripe.StripeClient) -> int:
    """Give every tenant without one a Stripe customer; returns how many were made."""
    made = 0
    with transaction(sessions) as session:
        tenants = session.scalars(
            select(Tenant)
            .where(Tenant.stripe_customer_id.is_(None))
            .with_for_update(skip_locked=True)
        ).all()
        for tenant in tenants:
            customer = api.v1.customers.create(
                {"name": tenant.name, "metadata": {"gpuhost_tenant_id": str(tenant.id)}},
                {"idempotency_key": f"gpuhost-customer-{tenant.id}"},
            )
            tenant.stripe_customer_id = customer.id
            made += 1
    return made


def relay_once(
    sessions: sessionmaker[Session],
    api: stripe.StripeClient,
    settings: StripeSettings,
    after_send: Callable[[OutboxEvent], None] | None = None,
) -> Pass:
    """Send one batch of unsent outbox rows. `after_send` runs after each 2xx, before the
    commit (tests use it to stand for a relay that dies there)."""
    sent = failed = 0
    with transaction(sessions) as session:
        rows = session.execute(
            select(OutboxEvent, Tenant.stripe_customer_id)
            .join(Tenant, Tenant.id == OutboxEvent.tenant_id)
            .where(OutboxEvent.sent_at.is_(None), Tenant.stripe_customer_id.is_not(None))
            .order_by(OutboxEvent.created_at)
            .limit(settings.relay_batch_size)
            .with_for_update(of=OutboxEvent, skip_locked=True)
        ).all()
        waiting = session.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .join(Tenant, Tenant.id == OutboxEvent.tenant_id)
            .where(OutboxEvent.sent_at.is_(None), Tenant.stripe_customer_id.is_(None))
        )
        for row, customer in rows:
            try:
                api.v1.billing.meter_events.create(
                    {
                        "event_name": settings.stripe_meter_event_name,
                        "payload": {"stripe_customer_id": customer, "value": str(row.quantity)},
                        "identifier": str(row.usage_record_id),
                        "timestamp": int(row.event_time.timestamp()),
                    },
                    {"idempotency_key": f"gpuhost-meter-{row.usage_record_id}"},
                )
            except stripe.StripeError as exc:
                failed += 1
                row.attempts += 1
                row.last_error = f"{type(exc).__name__}: {exc}"[:1000]
                log.warning("meter event for %s failed: %s", row.usage_record_id, exc)
                continue
            if after_send is not None:
                after_send(row)
            row.sent_at = datetime.now(UTC)
            row.attempts += 1
            row.last_error = None
            sent += 1
    return Pass(sent, failed, waiting)


def stale(sessions: sessionmaker[Session], older_than: timedelta) -> int:
    """Unsent rows older than `older_than`: what an operator should be alerted about."""
    with sessions() as session:
        return session.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .where(
                OutboxEvent.sent_at.is_(None),
                OutboxEvent.created_at < datetime.now(UTC) - older_than,
            )
        )


@dataclass(frozen=True)
class Difference:
    tenant_id: str
    customer: str
    ledger_milli: int  # what the usage records say
    pending_milli: int  # of which not yet sent (the relay's backlog)
    stripe_milli: int  # what Stripe's meter holds

    @property
    def unexplained(self) -> int:
        return self.ledger_milli - self.pending_milli - self.stripe_milli


def reconcile(
    sessions: sessionmaker[Session],
    api: stripe.StripeClient,
    settings: StripeSettings,
    start: datetime,
    end: datetime,
    customers: set[str] | None = None,
) -> list[Difference]:
    """Ledger totals against Stripe's meter summaries, per customer, for [start, end)."""
    if not settings.stripe_meter_id:
        raise RuntimeError("set GPUHOST_STRIPE_METER_ID to the meter to reconcile against")
    in_range = (UsageRecord.finished_at >= start, UsageRecord.finished_at < end)
    ledger = func.sum(func.floor(UsageRecord.gpu_seconds * 1000 + 0.5))
    with sessions() as session:
        rows = session.execute(
            select(Tenant.id, Tenant.stripe_customer_id, func.coalesce(ledger, 0))
            .join(UsageRecord, UsageRecord.tenant_id == Tenant.id)
            .where(Tenant.stripe_customer_id.is_not(None), *in_range)
            .group_by(Tenant.id, Tenant.stripe_customer_id)
        ).all()
        pending = dict(
            session.execute(
                select(OutboxEvent.tenant_id, func.sum(OutboxEvent.quantity))
                .where(
                    OutboxEvent.sent_at.is_(None),
                    OutboxEvent.event_time >= start,
                    OutboxEvent.event_time < end,
                )
                .group_by(OutboxEvent.tenant_id)
            ).all()
        )
    found = []
    for tenant_id, customer, total in rows:
        if customers is not None and customer not in customers:
            continue
        summaries = api.v1.billing.meters.event_summaries.list(
            settings.stripe_meter_id,
            {
                "customer": customer,
                "start_time": int(start.timestamp()),
                "end_time": int(end.timestamp()),
            },
        )
        held = sum(s.aggregated_value for s in summaries.data)
        found.append(
            Difference(
                str(tenant_id),
                customer,
                int(total),
                int(pending.get(tenant_id, 0)),
                int(round(held)),
            )
        )
    return found
