"""The ledger's tables."""

import uuid
from datetime import datetime

from sqlalchemy import (
    ARRAY,
    BigInteger,
    DateTime,
    Double,
    ForeignKey,
    Identity,
    Index,
    Integer,
    String,
    Text,
    Uuid,
    func,
)
from sqlalchemy.dialects.postgresql import JSONB
from sqlalchemy.orm import Mapped, mapped_column, relationship

from billing.db import Base


class Tenant(Base):
    __tablename__ = "tenants"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    name: Mapped[str] = mapped_column(String(200))
    tier: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    stripe_customer_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    stripe_subscription_id: Mapped[str | None] = mapped_column(String(255), unique=True)
    # The tier the Stripe subscription is on; differs from `tier` until the next sync.
    stripe_subscription_tier: Mapped[str | None] = mapped_column(String(32))

    keys: Mapped[list["ApiKey"]] = relationship(back_populates="tenant")


class ApiKey(Base):
    __tablename__ = "api_keys"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), index=True
    )
    # sha256 of the whole key, hex. The key itself is never stored.
    key_hash: Mapped[str] = mapped_column(String(64), unique=True)
    prefix: Mapped[str] = mapped_column(String(16))
    last_four: Mapped[str] = mapped_column(String(4))
    scopes: Mapped[list[str]] = mapped_column(ARRAY(Text))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    last_used_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    tenant: Mapped[Tenant] = relationship(back_populates="keys")


class UsageRecord(Base):
    """One row per request id, never two (the unique constraint is the guarantee)."""

    __tablename__ = "usage_records"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    request_id: Mapped[str] = mapped_column(String(64), unique=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="RESTRICT"), index=True
    )
    api_key_id: Mapped[uuid.UUID | None] = mapped_column(
        ForeignKey("api_keys.id", ondelete="SET NULL")
    )
    model: Mapped[str] = mapped_column(String(200))
    kind: Mapped[str] = mapped_column(String(32))
    status: Mapped[str] = mapped_column(String(32))
    gpu_seconds: Mapped[float] = mapped_column(Double)
    queue_seconds: Mapped[float] = mapped_column(Double)
    prompt_tokens: Mapped[int] = mapped_column(Integer, default=0)
    output_tokens: Mapped[int] = mapped_column(Integer, default=0)
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    # the request's trace id (32 hex digits), when it was traced: a complaint leads to it
    trace_id: Mapped[str | None] = mapped_column(String(32))


class UsageTotal(Base):
    """A tenant's GPU-seconds in one calendar month (UTC), kept equal to the sum of its usage
    records by a trigger on usage_records (migration 0010): read, never written, by code."""

    __tablename__ = "usage_totals"

    tenant_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("tenants.id", ondelete="CASCADE"), primary_key=True
    )
    period_start: Mapped[datetime] = mapped_column(DateTime(timezone=True), primary_key=True)
    gpu_seconds: Mapped[float] = mapped_column(Double)
    records: Mapped[int] = mapped_column(Integer)


class OutboxEvent(Base):
    """A usage record on its way to Stripe's meter: written in the usage record's transaction,
    marked sent only after Stripe has acknowledged it (the relay is a later step)."""

    __tablename__ = "billing_outbox"

    id: Mapped[uuid.UUID] = mapped_column(Uuid, primary_key=True, default=uuid.uuid4)
    usage_record_id: Mapped[uuid.UUID] = mapped_column(
        ForeignKey("usage_records.id", ondelete="RESTRICT"), unique=True
    )
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    # Integer milli-GPU-seconds: what the meter event carries.
    quantity: Mapped[int] = mapped_column(Integer)
    event_time: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    sent_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    attempts: Mapped[int] = mapped_column(Integer, default=0)
    last_error: Mapped[str | None] = mapped_column(Text)
    # After a failed attempt: not tried again before this time (exponential backoff).
    retry_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # With aggregation on: the meter event this row is part of (fixed before it is sent).
    batch_id: Mapped[uuid.UUID | None] = mapped_column(Uuid, index=True)
    # What Stripe reported about the row's meter event after taking it (a meter error
    # report: billing.stripe_meter_errors), e.g. "meter_event_customer_not_found: ...":
    # Stripe did not count it.
    stripe_error: Mapped[str | None] = mapped_column(Text)
    stripe_error_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))


class MeterErrorReport(Base):
    """A Stripe meter error report as its event destination delivered it (a thin event: its id
    and type), fetched in full by the relay, which flags the outbox rows it names."""

    __tablename__ = "stripe_meter_error_reports"

    id: Mapped[str] = mapped_column(Text, primary_key=True)  # Stripe's event id
    type: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )
    fetched_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    error_count: Mapped[int | None] = mapped_column(Integer)
    summary: Mapped[str | None] = mapped_column(Text)


class StripeEventApplied(Base):
    """A Stripe webhook event already applied: sent again (a retry, a replay), it changes
    nothing. Kept for `stripe_events.KEEP_DAYS`, longer than Stripe retries one."""

    __tablename__ = "stripe_events_applied"
    __table_args__ = (Index("stripe_events_applied_received", "received_at"),)

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    type: Mapped[str] = mapped_column(Text)
    received_at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now()
    )


class StripeSubscription(Base):
    """A Stripe subscription as its last applied event left it, and that event's time: an
    event about it created earlier is stale."""

    __tablename__ = "stripe_subscriptions"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="CASCADE"))
    status: Mapped[str] = mapped_column(Text)
    tier: Mapped[str] = mapped_column(String(32))
    event_created: Mapped[int] = mapped_column(BigInteger)


class AuditEntry(Base):
    """One operator action, written in the transaction of the change it records."""

    __tablename__ = "audit_log"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    at: Mapped[datetime] = mapped_column(
        DateTime(timezone=True), server_default=func.now(), index=True
    )
    actor: Mapped[str] = mapped_column(String(200))
    action: Mapped[str] = mapped_column(String(64))
    target: Mapped[str] = mapped_column(String(200))
    detail: Mapped[dict] = mapped_column(JSONB, default=dict)
    client: Mapped[str | None] = mapped_column(String(64))
