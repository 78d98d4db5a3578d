"""Stripe's meter error reports: meter events Stripe took (2xx) and then could not count.

Stripe validates a meter event after answering it: one for a customer it does not know, or
for a meter that is gone, is dropped, and reported later in a `v1.billing.meter.error_report_
triggered` (or `v1.billing.meter.no_meter_found`) event sent to an event destination. Those
are thin events: the gateway verifies one and records its id (`receive`); the relay, which
holds the API key, fetches the event in full on its next pass (`fetch_reports`) and flags
the outbox rows whose identifiers it names as samples (`OutboxEvent.stripe_error`);
`gpuhost billing reconcile` names them (`flagged`). Stripe names samples, not every event:
the report's `error_count` says how many there were in its window.
"""

import logging
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

import stripe
from sqlalchemy import or_, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session, sessionmaker

from billing.db import transaction
from billing.models import MeterErrorReport, OutboxEvent
from billing.stripe_events import BadEvent, signed_json

log = logging.getLogger(__name__)

REPORTS = {"v1.billing.meter.error_report_triggered", "v1.billing.meter.no_meter_found"}


def verify(payload: bytes, signature: str, secret: str) -> dict:
    """A thin event's notification, its signature checked (the same scheme as webhooks)."""
    notification = signed_json(payload, signature, secret)
    if not isinstance(notification, dict) or not isinstance(notification.get("id"), str):
        raise BadEvent("not a Stripe event notification (no id)")
    return notification


async def receive(session: AsyncSession, notification: dict) -> bool:
    """Record a meter error report for the relay to fetch (again: nothing changes). False
    for an event of another type, acknowledged and ignored."""
    if notification.get("type") not in REPORTS:
        return False
    await session.execute(
        insert(MeterErrorReport)
        .values(id=notification["id"], type=notification["type"])
        .on_conflict_do_nothing(index_elements=["id"])
    )
    return True


def fetch_reports(sessions: sessionmaker[Session], api: stripe.StripeClient) -> int:
    """Fetch the reports received and not yet fetched, flag the rows they name; the number of
    rows flagged. A report that cannot be fetched now is tried on a later pass."""
    flagged = 0
    with transaction(sessions) as session:
        waiting = session.scalars(
            select(MeterErrorReport)
            .where(MeterErrorReport.fetched_at.is_(None))
            .order_by(MeterErrorReport.received_at)
            .limit(50)
            .with_for_update(skip_locked=True)
        ).all()
        for report in waiting:
            event = api.v2.core.events.retrieve(report.id)
            data = event.to_dict().get("data") or {}
            reason = data.get("reason") or {}
            for kind in reason.get("error_types") or []:
                for sample in kind.get("sample_errors") or []:
                    identifier = (sample.get("request") or {}).get("identifier", "")
                    error = f"{kind.get('code')}: {sample.get('error_message', '')}"
                    flagged += _flag(session, identifier, error)
            report.fetched_at = datetime.now(UTC)
            report.error_count = reason.get("error_count")
            report.summary = data.get("developer_message_summary")
            log.warning(
                "Stripe meter error report %s: %s event(s) not counted: %s",
                report.id,
                report.error_count,
                report.summary,
            )
    return flagged


def _flag(session: Session, identifier: str, error: str) -> int:
    """Flag the outbox rows of a meter event (identifier: a usage record's id, or a batch's)."""
    try:
        event_id = uuid.UUID(identifier)
    except ValueError:
        log.warning("meter error report names %r: not one of ours", identifier)
        return 0
    done = session.execute(
        update(OutboxEvent)
        .where(or_(OutboxEvent.usage_record_id == event_id, OutboxEvent.batch_id == event_id))
        .values(stripe_error=error, stripe_error_at=datetime.now(UTC))
    )
    return done.rowcount


@dataclass(frozen=True)
class Rejected:
    """A meter event Stripe took and then reported it could not count."""

    identifier: str  # the usage record's id (or the batch's)
    tenant_id: str
    quantity_milli: int
    error: str


def flagged(session: Session, start: datetime, end: datetime) -> list[Rejected]:
    """The rows Stripe reported, of events in [start, end)."""
    rows = session.execute(
        select(OutboxEvent)
        .where(
            OutboxEvent.stripe_error.is_not(None),
            OutboxEvent.event_time >= start,
            OutboxEvent.event_time < end,
        )
        .order_by(OutboxEvent.event_time)
    ).scalars()
    return [
        Rejected(
            str(row.batch_id or row.usage_record_id),
            str(row.tenant_id),
            row.quantity,
            row.stripe_error,
        )
        for row in rows
    ]
