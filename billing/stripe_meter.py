"""GPU-seconds to Stripe, exactly once: the outbox's step of each billing relay pass
(`billing.relay`), and the customers the meter events need.

Every billable usage record has an outbox row, written in the record's own transaction. The
relay takes unsent rows (`FOR UPDATE SKIP LOCKED`, so concurrent relays never take the same
row), sends each as a Billing Meter event in integer milli-GPU-seconds, with
`identifier` = the usage record id and the same value as idempotency key, and marks it sent
only after Stripe's 2xx, in the same transaction that locked it. A relay that dies after
Stripe's 2xx but before its commit leaves the row unsent: the next relay sends it again, and
Stripe keeps one event (same identifier, same idempotency key). Failures are counted on the
row and retried on a later pass; nothing is dropped.

Only billing's Stripe modules (this one, `stripe_catalog`, `stripe_events`, `relay`) and the
operator's command line import the `stripe` SDK; the gateway and workers never do.
"""

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import stripe
from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session, sessionmaker

from billing import stripe_meter_errors
from billing.db import transaction
from billing.models import OutboxEvent, Tenant, UsageRecord
from billing.settings import StripeSettings

log = logging.getLogger(__name__)

ASSIGN_LIMIT = 100_000


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
    already_delivered: int = 0  # of `sent`: events Stripe already held (a repeated identifier)


# Stripe's answer to a meter event whose identifier it has already taken (400, marked not to
# be retried): the event was delivered before, e.g. by a pass whose commit was lost, or rows
# sent again after a restore, once the idempotency key's 24 hours are over.
ALREADY_DELIVERED = "An event already exists with identifier"


def already_delivered(exc: stripe.StripeError) -> bool:
    return (
        isinstance(exc, stripe.InvalidRequestError)
        and exc.http_status == 400
        and ALREADY_DELIVERED in (exc.user_message or "")
    )


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


@dataclass
class _Event:
    """One meter event: the outbox rows it carries, summed."""

    rows: list[OutboxEvent]
    customer: str
    identifier: str
    timestamp: int

    @property
    def value(self) -> int:
        return sum(row.quantity for row in self.rows)


def relay_once(
    sessions: sessionmaker[Session],
    api: stripe.StripeClient,
    settings: StripeSettings,
    after_send: Callable[[_Event], None] | None = None,
) -> Pass:
    """Send one batch of unsent outbox rows. `after_send` runs after each 2xx, before the
    commit (tests use it to stand for a relay that dies there)."""
    if settings.relay_aggregate_seconds > 0:
        _assign_batches(sessions, settings)
    sent = failed = duplicates = 0
    with transaction(sessions) as session:
        waiting = session.scalar(
            select(func.count())
            .select_from(OutboxEvent)
            .join(Tenant, Tenant.id == OutboxEvent.tenant_id)
            .where(OutboxEvent.sent_at.is_(None), Tenant.stripe_customer_id.is_(None))
        )
        events = _batched_events(session, settings)  # batches already formed go out first
        if settings.relay_aggregate_seconds <= 0:
            events += _single_events(session, settings)
        for event in events:
            try:
                api.v1.billing.meter_events.create(
                    {
                        "event_name": settings.stripe_meter_event_name,
                        "payload": {
                            "stripe_customer_id": event.customer,
                            "value": str(event.value),
                        },
                        "identifier": event.identifier,
                        "timestamp": event.timestamp,
                    },
                    {"idempotency_key": f"gpuhost-meter-{event.identifier}"},
                )
            except stripe.StripeError as exc:
                if already_delivered(exc):  # delivered before: sent, never retried
                    duplicates += 1
                    log.info("meter event %s: Stripe already has it", event.identifier)
                else:
                    failed += 1
                    for row in event.rows:
                        row.attempts += 1
                        row.last_error = f"{type(exc).__name__}: {exc}"[:1000]
                        row.retry_after = datetime.now(UTC) + _backoff(settings, row.attempts)
                    log.warning("meter event %s failed: %s", event.identifier, exc)
                    continue
            if after_send is not None:
                after_send(event)
            now = datetime.now(UTC)
            for row in event.rows:
                row.sent_at, row.last_error, row.retry_after = now, None, None
                row.attempts += 1
            sent += 1
    return Pass(sent, failed, waiting, duplicates)


def _backoff(settings: StripeSettings, attempts: int) -> timedelta:
    seconds = settings.relay_backoff_base_seconds * 2 ** max(0, attempts - 1)
    return timedelta(seconds=min(seconds, settings.relay_backoff_cap_seconds))


def _due():
    """Rows not waiting out a backoff."""
    return or_(OutboxEvent.retry_after.is_(None), OutboxEvent.retry_after <= func.now())


def _unsent(settings: StripeSettings):
    return (
        select(OutboxEvent, Tenant.stripe_customer_id)
        .join(Tenant, Tenant.id == OutboxEvent.tenant_id)
        .where(OutboxEvent.sent_at.is_(None), Tenant.stripe_customer_id.is_not(None), _due())
        .order_by(OutboxEvent.created_at)
        .limit(settings.relay_batch_size)
        .with_for_update(of=OutboxEvent, skip_locked=True)
    )


def _single_events(session: Session, settings: StripeSettings) -> list[_Event]:
    """One event per usage record: identifier = the record's id."""
    rows = session.execute(_unsent(settings).where(OutboxEvent.batch_id.is_(None))).all()
    return [
        _Event([row], customer, str(row.usage_record_id), int(row.event_time.timestamp()))
        for row, customer in rows
    ]


def _window_start(moment: datetime, seconds: int) -> datetime:
    stamp = int(moment.timestamp())
    return datetime.fromtimestamp(stamp - stamp % seconds, UTC)


def _assign_batches(sessions: sessionmaker[Session], settings: StripeSettings) -> None:
    """Put the unsent rows of closed windows into batches, one per tenant and window, and
    commit that before anything is sent: a batch never changes once it may have reached
    Stripe, so resending it after a crash repeats the same identifier and the same value."""
    width = settings.relay_aggregate_seconds
    closed = _window_start(
        datetime.now(UTC) - timedelta(seconds=settings.relay_aggregate_grace_seconds), width
    )
    with transaction(sessions) as session:
        rows = session.execute(
            _unsent(settings)
            .where(OutboxEvent.batch_id.is_(None), OutboxEvent.event_time < closed)
            .limit(ASSIGN_LIMIT)  # binding rows is cheap: far more than one pass sends
        ).all()
        batches: dict[tuple, uuid.UUID] = {}
        for row, _ in rows:
            key = (row.tenant_id, _window_start(row.event_time, width))
            row.batch_id = batches.setdefault(key, uuid.uuid4())


def _batched_events(session: Session, settings: StripeSettings) -> list[_Event]:
    """One event per batch whose rows this relay holds, all of them (a batch partly locked by
    another relay is left to that relay)."""
    batch_ids = session.scalars(
        select(OutboxEvent.batch_id)
        .where(OutboxEvent.sent_at.is_(None), OutboxEvent.batch_id.is_not(None))
        .group_by(OutboxEvent.batch_id)
        .limit(settings.relay_batch_size)
    ).all()
    rows = session.execute(
        select(OutboxEvent, Tenant.stripe_customer_id)
        .join(Tenant, Tenant.id == OutboxEvent.tenant_id)
        .where(OutboxEvent.batch_id.in_(batch_ids), OutboxEvent.sent_at.is_(None), _due())
        .where(Tenant.stripe_customer_id.is_not(None))
        .with_for_update(of=OutboxEvent, skip_locked=True)
    ).all()
    held: dict[uuid.UUID, list] = {}
    for row, customer in rows:
        held.setdefault(row.batch_id, []).append((row, customer))
    sizes = dict(
        session.execute(
            select(OutboxEvent.batch_id, func.count())
            .where(OutboxEvent.batch_id.in_(list(held)), OutboxEvent.sent_at.is_(None))
            .group_by(OutboxEvent.batch_id)
        ).all()
    )
    events = []
    for batch_id, members in held.items():
        if len(members) != sizes.get(batch_id):
            continue
        first = min(row.event_time for row, _ in members)
        window = _window_start(first, settings.relay_aggregate_seconds)
        events.append(
            _Event(
                [row for row, _ in members], members[0][1], str(batch_id), int(window.timestamp())
            )
        )
    return events


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
    rejected_milli: int = 0  # sent, then reported by Stripe as not counted (error reports)

    @property
    def unexplained(self) -> int:
        return self.ledger_milli - self.pending_milli - self.stripe_milli - self.rejected_milli


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
        rejected: dict[str, int] = {}
        for row in stripe_meter_errors.flagged(session, start, end):
            rejected[row.tenant_id] = rejected.get(row.tenant_id, 0) + row.quantity_milli
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
                rejected.get(str(tenant_id), 0),
            )
        )
    return found
