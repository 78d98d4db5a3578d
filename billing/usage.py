"""Usage records: written once per request id, listed per tenant."""

import uuid
from dataclasses import asdict, dataclass
from datetime import datetime

from sqlalchemy import Select, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from billing.models import UsageRecord


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
    """Insert the record unless one exists for this request id. True if this call wrote it."""
    statement = (
        insert(UsageRecord)
        .values(id=uuid.uuid4(), **asdict(usage))
        .on_conflict_do_nothing(index_elements=[UsageRecord.request_id])
        .returning(UsageRecord.id)
    )
    return session.execute(statement).first() is not None


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
