"""Tenants' files (`/v1/files`, OpenAI's Files API): the table that names them, and the
reads and writes on it. The bytes are objects in storage (`storage.file_key`: under
`tenants/<id>/files/`), written and removed by the gateway (`api/deferred/files.py`); a row
says whose file it is, what it is for and when it expires.

A tenant keeps at most its plan's `file_bytes` of files; an upload that would pass it is
refused, and two uploads at once cannot both pass it (the tenant's row is locked while one is
counted). A file past its `expires_at` is gone at once to every read (and no longer counts);
the gateways' sweep removes its bytes and its row afterwards.
"""

import logging
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from sqlalchemy import (
    BigInteger,
    DateTime,
    ForeignKey,
    Index,
    String,
    Text,
    func,
    or_,
    select,
    tuple_,
)
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Mapped, mapped_column

from billing.db import Base, async_transaction
from billing.models import Tenant
from config.plans import Plan

log = logging.getLogger(__name__)

# What a tenant uploads a file for; `batch_output` files are written by the service.
PURPOSES = ("batch", "fine-tune", "user_data")
BATCH_OUTPUT = "batch_output"
SWEEP_BATCH = 500


class StoredFile(Base):
    __tablename__ = "files"
    __table_args__ = (Index("files_tenant_created", "tenant_id", "created_at", "id"),)

    id: Mapped[str] = mapped_column(String(64), primary_key=True)
    tenant_id: Mapped[uuid.UUID] = mapped_column(ForeignKey("tenants.id", ondelete="RESTRICT"))
    purpose: Mapped[str] = mapped_column(String(32))
    filename: Mapped[str] = mapped_column(Text)
    bytes: Mapped[int] = mapped_column(BigInteger)
    storage_key: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True), server_default=func.now())
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)


def new_file_id() -> str:
    return "file-" + uuid.uuid4().hex


def _live(now: datetime):
    return or_(StoredFile.expires_at.is_(None), StoredFile.expires_at > now)


def expiry(now: datetime, asked: int | None, most: int) -> datetime | None:
    """When a file made `now` expires: after `asked` seconds if the client set it, never later
    than the operator's `most` (0: no limit); None: kept until deleted."""
    seconds = [s for s in (asked, most or None) if s]
    return now + timedelta(seconds=min(seconds)) if seconds else None


async def used_bytes(session: AsyncSession, tenant_id: uuid.UUID, now: datetime) -> int:
    total = await session.scalar(
        select(func.coalesce(func.sum(StoredFile.bytes), 0)).where(
            StoredFile.tenant_id == tenant_id, _live(now)
        )
    )
    return int(total)


class OverQuota(Exception):
    """The file would take the tenant past its plan's bytes (nothing was kept)."""

    def __init__(self, plan: Plan, used: int):
        super().__init__(plan.tier)
        self.plan, self.used = plan, used


async def add(
    sessions: async_sessionmaker, made: StoredFile, plan_of: Callable[[str], Plan], now: datetime
) -> StoredFile:
    """Keep the row of a file whose bytes are stored, if the tenant's files still fit its
    plan's `file_bytes` with it (`OverQuota` if not). The tenant's row is locked while its
    files are counted, its tier read there: uploads of one tenant at once, on any gateway, are
    counted one after the other, on the plan it has now (`plan_of` its tier's)."""
    async with async_transaction(sessions) as session:
        tier = await session.scalar(
            select(Tenant.tier).where(Tenant.id == made.tenant_id).with_for_update()
        )
        plan = plan_of(tier)
        used = await used_bytes(session, made.tenant_id, now)
        if used + made.bytes > plan.file_bytes:
            raise OverQuota(plan, used)
        session.add(made)
    return made


async def keep_output(sessions: async_sessionmaker, made: StoredFile) -> StoredFile:
    """Keep the row of a file the service wrote for the tenant (a batch's output): it counts
    against the plan's bytes from now on, but is kept whatever they are."""
    async with async_transaction(sessions) as session:
        session.add(made)
    return made


async def find(session: AsyncSession, tenant_id: uuid.UUID, file_id: str) -> StoredFile | None:
    """The tenant's file, unless it expired (another tenant's file is None too)."""
    return await session.scalar(
        select(StoredFile).where(
            StoredFile.id == file_id,
            StoredFile.tenant_id == tenant_id,
            _live(datetime.now(UTC)),
        )
    )


@dataclass(frozen=True)
class Page:
    files: list[StoredFile]
    has_more: bool


async def page(
    session: AsyncSession,
    tenant_id: uuid.UUID,
    purpose: str | None,
    limit: int,
    after: StoredFile | None,
    ascending: bool,
) -> Page:
    """A page of the tenant's files by creation time (then id), after the file `after`."""
    query = select(StoredFile).where(StoredFile.tenant_id == tenant_id, _live(datetime.now(UTC)))
    if purpose is not None:
        query = query.where(StoredFile.purpose == purpose)
    place = (StoredFile.created_at, StoredFile.id)
    if after is not None:
        mark = tuple_(*place), tuple_(after.created_at, after.id)
        query = query.where(mark[0] > mark[1] if ascending else mark[0] < mark[1])
    order = [c.asc() if ascending else c.desc() for c in place]
    found = list(await session.scalars(query.order_by(*order).limit(limit + 1)))
    return Page(found[:limit], len(found) > limit)


async def delete_row(sessions: async_sessionmaker, file_id: str) -> None:
    async with async_transaction(sessions) as session:
        await session.execute(
            StoredFile.__table__.delete().where(StoredFile.__table__.c.id == file_id)
        )


async def expired(sessions: async_sessionmaker, most: int = SWEEP_BATCH) -> list[StoredFile]:
    """Up to `most` files past their expiry (every tenant's)."""
    async with sessions() as session:
        query = select(StoredFile).where(StoredFile.expires_at <= datetime.now(UTC)).limit(most)
        return list(await session.scalars(query))
