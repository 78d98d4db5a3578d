"""Usage records: written once per request id, listed per tenant."""

import uuid
from dataclasses import asdict, dataclass
from datetime import UTC, datetime

from sqlalchemy import Select, case, func, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from billing.models import OutboxEvent, Tenant, UsageRecord

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


def record(session: Session, usage: UsageCreate) -> bool:
    """Insert the record unless one exists for this request id. True if this call wrote it.

    A billable record also gets its outbox row (for Stripe), in the same transaction.
    """
    statement = (
        insert(UsageRecord)
        .values(id=uuid.uuid4(), **asdict(usage))
        .on_conflict_do_nothing(index_elements=[UsageRecord.request_id])
        .returning(UsageRecord.id)
    )
    written = session.execute(statement).first()
    if written is None:
        return False
    quantity = milli(usage.gpu_seconds)
    if quantity > 0:
        session.add(
            OutboxEvent(
                id=uuid.uuid4(),
                usage_record_id=written[0],
                tenant_id=usage.tenant_id,
                quantity=quantity,
                event_time=usage.finished_at,
                attempts=0,
            )
        )
        session.flush()
    return True


def milli(gpu_seconds: float) -> int:
    """GPU-seconds as reported to billing: integer milli-GPU-seconds (rounded half up)."""
    return int(gpu_seconds * 1000 + 0.5)


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
    session: AsyncSession, tenant_id: uuid.UUID, start: datetime, end: datetime
) -> tuple[str, float] | None:
    """The tenant's current tier and the GPU-seconds it used in [start, end); None if gone."""
    used = (
        select(func.coalesce(func.sum(UsageRecord.gpu_seconds), 0.0))
        .where(
            UsageRecord.tenant_id == tenant_id,
            UsageRecord.finished_at >= start,
            UsageRecord.finished_at < end,
        )
        .scalar_subquery()
    )
    row = (await session.execute(select(Tenant.tier, used).where(Tenant.id == tenant_id))).first()
    return (row[0], float(row[1])) if row else None


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
