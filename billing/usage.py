"""Usage records: written once per request id, listed per tenant."""

import uuid
from dataclasses import dataclass, fields
from datetime import UTC, datetime

from sqlalchemy import Select, case, func, select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from billing.models import OutboxEvent, Tenant, UsageRecord, UsageTotal
from billing.plans import Period

IMAGE_KINDS = ("txt2img", "img2img", "inpaint")


@dataclass(frozen=True)
class UsageCreate:
    request_id: str
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID | None
    model: str
    kind: str
    status: str  # completed | cancelled | failed | rejected
    gpu_seconds: float
    queue_seconds: float
    prompt_tokens: int
    output_tokens: int
    started_at: datetime | None
    finished_at: datetime
    trace_id: str | None = None  # the request's trace, when it was traced (config/traces.py)


def record(session: Session, usage: UsageCreate) -> bool:
    """Insert the record unless one exists for this request id. True if this call wrote it.

    A billable record also gets its outbox row (for Stripe), in the same transaction.
    """
    [written] = record_many(session, [usage])
    return written


# A batch of records goes in as one array per column, unnested into rows by PostgreSQL.
_COLUMNS = {
    "id": "uuid",
    "request_id": "text",
    "tenant_id": "uuid",
    "api_key_id": "uuid",
    "model": "text",
    "kind": "text",
    "status": "text",
    "gpu_seconds": "float8",
    "queue_seconds": "float8",
    "prompt_tokens": "int4",
    "output_tokens": "int4",
    "started_at": "timestamptz",
    "finished_at": "timestamptz",
    "trace_id": "text",
    "quantity": "int4",  # milli-GPU-seconds, for the outbox row
}
_FIELDS = {f.name for f in fields(UsageCreate)}
_RECORD_COLUMNS = ", ".join(name for name in _COLUMNS if name != "quantity")
_INSERT = f"""
WITH incoming AS (
    SELECT * FROM unnest({", ".join(f"%({n})s::{t}[]" for n, t in _COLUMNS.items())})
        AS t({", ".join(_COLUMNS)})
), written AS (
    INSERT INTO usage_records ({_RECORD_COLUMNS})
    SELECT {_RECORD_COLUMNS} FROM incoming
    ON CONFLICT (request_id) DO NOTHING
    RETURNING id
), queued AS (
    INSERT INTO billing_outbox (id, usage_record_id, tenant_id, quantity, event_time, attempts)
    SELECT gen_random_uuid(), i.id, i.tenant_id, i.quantity, i.finished_at, 0
    FROM incoming i JOIN written w ON w.id = i.id
    WHERE i.quantity > 0
)
SELECT id FROM written
"""


def record_many(session: Session, usages: list[UsageCreate]) -> list[bool]:
    """`record` for many at once, in the session's transaction, in one statement: the records
    go in as column arrays, and the outbox rows of those written with them. Returns, in
    order, whether each was written (False: its request id was already recorded, in the
    ledger or earlier in `usages`)."""
    ids = [uuid.uuid4() for _ in usages]
    columns: dict[str, list] = {
        name: [getattr(u, name) for u in usages] for name in _COLUMNS if name in _FIELDS
    }
    columns["id"] = ids
    columns["quantity"] = [milli(u.gpu_seconds) for u in usages]
    session.flush()  # what the session holds (a tenant made just now, say) first
    cursor = session.connection().connection.driver_connection.cursor()
    with cursor:
        written = {row[0] for row in cursor.execute(_INSERT, columns).fetchall()}
    return [record_id in written for record_id in ids]


def milli(gpu_seconds: float) -> int:
    """GPU-seconds as reported to billing: integer milli-GPU-seconds (rounded half up)."""
    return int(gpu_seconds * 1000 + 0.5)


def billed_seconds(gpu_seconds: float) -> float:
    """GPU-seconds as billed: to the millisecond. A worker records and answers a run's time
    so (`workers/tasks.py`, the trainer's checkpoints): the ledger, Stripe's meter and every
    answer carry the one figure."""
    return milli(gpu_seconds) / 1000


def exists(session: Session, request_id: str) -> bool:
    found = session.execute(
        select(UsageRecord.id).where(UsageRecord.request_id == request_id)
    ).first()
    return found is not None


def _recent(tenant_id: uuid.UUID, limit: int) -> Select:
    return (
        select(UsageRecord)
        .where(UsageRecord.tenant_id == tenant_id)
        .order_by(UsageRecord.finished_at.desc())
        .limit(limit)
    )


def for_tenant(session: Session, tenant_id: uuid.UUID, limit: int = 100) -> list[UsageRecord]:
    return list(session.scalars(_recent(tenant_id, limit)))


async def recent(
    session: AsyncSession, tenant_id: uuid.UUID, limit: int = 100
) -> list[UsageRecord]:
    """The tenant's latest records, newest first (the gateway's async session)."""
    return list(await session.scalars(_recent(tenant_id, limit)))


def to_dict(row: UsageRecord) -> dict:
    return {
        "request_id": row.request_id,
        "model": row.model,
        "kind": row.kind,
        "status": row.status,
        "gpu_seconds": round(row.gpu_seconds, 3),
        "queue_seconds": round(row.queue_seconds, 3),
        "prompt_tokens": row.prompt_tokens,
        "output_tokens": row.output_tokens,
        "started_at": row.started_at.isoformat() if row.started_at else None,
        "finished_at": row.finished_at.isoformat(),
    }


async def admission_view(
    session: AsyncSession, tenant_id: uuid.UUID, period: Period
) -> tuple[str, float] | None:
    """The tenant's current tier and the GPU-seconds it used in `period` (a calendar month);
    None if the tenant is gone. One row's read: the month's total is kept by the database."""
    used = (
        select(UsageTotal.gpu_seconds)
        .where(UsageTotal.tenant_id == tenant_id, UsageTotal.period_start == period.start)
        .scalar_subquery()
    )
    row = (
        await session.execute(
            select(Tenant.tier, func.coalesce(used, 0.0)).where(Tenant.id == tenant_id)
        )
    ).first()
    return (row[0], float(row[1])) if row else None


async def used_between(
    session: AsyncSession, tenant_id: uuid.UUID, start: datetime, end: datetime
) -> float:
    """GPU-seconds of the tenant's requests that finished in [start, end)."""
    used = await session.scalar(
        select(func.coalesce(func.sum(UsageRecord.gpu_seconds), 0.0)).where(
            UsageRecord.tenant_id == tenant_id,
            UsageRecord.finished_at >= start,
            UsageRecord.finished_at < end,
        )
    )
    return float(used)


async def buckets(
    session: AsyncSession, tenant_id: uuid.UUID, since: datetime, unit: str
) -> list[dict]:
    """Usage per hour or day since `since`: GPU-seconds, requests, tokens, images."""
    bucket = func.date_trunc(unit, UsageRecord.finished_at, "UTC").label("bucket")
    images = func.sum(case((UsageRecord.kind.in_(IMAGE_KINDS), UsageRecord.output_tokens), else_=0))
    tokens = func.sum(case((UsageRecord.kind.in_(IMAGE_KINDS), 0), else_=UsageRecord.output_tokens))
    rows = await session.execute(
        select(
            bucket,
            func.sum(UsageRecord.gpu_seconds),
            func.count(),
            func.sum(UsageRecord.prompt_tokens),
            tokens,
            images,
        )
        .where(UsageRecord.tenant_id == tenant_id, UsageRecord.finished_at >= since)
        .group_by(bucket)
        .order_by(bucket)
    )
    return [
        {
            "start": start.replace(tzinfo=UTC).isoformat(),
            "gpu_seconds": round(float(gpu), 3),
            "requests": count,
            "prompt_tokens": int(prompt or 0),
            "output_tokens": int(output or 0),
            "images": int(made or 0),
        }
        for start, gpu, count, prompt, output, made in rows
    ]


async def model_buckets(
    session: AsyncSession, tenant_id: uuid.UUID, since: datetime, unit: str
) -> list[tuple[str, str, float]]:
    """GPU-seconds per hour or day and model since `since`: (bucket start, model, seconds)."""
    bucket = func.date_trunc(unit, UsageRecord.finished_at, "UTC").label("bucket")
    rows = await session.execute(
        select(bucket, UsageRecord.model, func.sum(UsageRecord.gpu_seconds))
        .where(UsageRecord.tenant_id == tenant_id, UsageRecord.finished_at >= since)
        .group_by(bucket, UsageRecord.model)
        .order_by(bucket)
    )
    return [
        (start.replace(tzinfo=UTC).isoformat(), model, float(gpu)) for start, model, gpu in rows
    ]


async def page(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    offset: int,
    limit: int,
    model: str | None = None,
) -> tuple[list[UsageRecord], int, list[str]]:
    """One page of the tenant's records, newest first (optionally one model's), how many
    there are in all, and the models the tenant has used."""
    where = [UsageRecord.tenant_id == tenant_id]
    if model:
        where.append(UsageRecord.model == model)
    rows = await session.scalars(
        select(UsageRecord)
        .where(*where)
        .order_by(UsageRecord.finished_at.desc(), UsageRecord.id)
        .offset(offset)
        .limit(limit)
    )
    total = await session.scalar(select(func.count()).select_from(UsageRecord).where(*where))
    models = await session.scalars(
        select(UsageRecord.model)
        .where(UsageRecord.tenant_id == tenant_id)
        .group_by(UsageRecord.model)
        .order_by(UsageRecord.model)
    )
    return list(rows), int(total or 0), list(models)


async def used_by_tenant(session: AsyncSession, period: Period) -> dict[uuid.UUID, float]:
    """GPU-seconds per tenant in `period`, a calendar month (tenants with none are absent):
    the totals the database keeps, a row per tenant rather than every record of the month."""
    rows = await session.execute(
        select(UsageTotal.tenant_id, UsageTotal.gpu_seconds).where(
            UsageTotal.period_start == period.start
        )
    )
    return {tenant_id: float(seconds) for tenant_id, seconds in rows}


async def used_by_model(session: AsyncSession, period: Period) -> list[tuple[str, float]]:
    """GPU-seconds per model in `period`, by model name."""
    in_period = (UsageRecord.finished_at >= period.start, UsageRecord.finished_at < period.end)
    rows = await session.execute(
        select(UsageRecord.model, func.sum(UsageRecord.gpu_seconds))
        .where(*in_period)
        .group_by(UsageRecord.model)
        .order_by(UsageRecord.model)
    )
    return [(model, float(seconds)) for model, seconds in rows]


async def outbox_backlog(session: AsyncSession) -> tuple[int, float]:
    """Usage records not yet accepted by Stripe, and the age of the oldest in seconds (0:
    none)."""
    unsent, oldest = (
        await session.execute(
            select(func.count(), func.min(OutboxEvent.created_at)).where(
                OutboxEvent.sent_at.is_(None)
            )
        )
    ).one()
    age = (datetime.now(UTC) - oldest).total_seconds() if oldest is not None else 0.0
    return int(unsent), max(0.0, age)
