"""Every statement about fine-tunes and adapters: the gateway's (async) and the train
worker's (sync). Services never commit; their callers own the transaction."""

import secrets
import uuid
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, text, tuple_, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from billing import usage
from tuning.models import (
    ACTIVE,
    CANCELLED,
    FAILED,
    QUEUED,
    RUNNING,
    SUCCEEDED,
    Adapter,
    FineTune,
    FineTuneSegment,
)

KIND = "fine_tune"  # the usage records' kind


class LimitReached(Exception):
    pass


def new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


# -- the gateway -----------------------------------------------------------------------------


async def create(
    session: AsyncSession,
    *,
    job_id: str,
    tenant_id: uuid.UUID,
    api_key_id: uuid.UUID | None,
    model: str,
    params: dict,
    dataset_key: str,
    dataset_images: int,
    dataset_bytes: int,
    max_active: int,
) -> FineTune:
    """A queued fine-tune, unless the tenant already has `max_active` queued or running
    (checked under a per-tenant lock, so two gateways cannot both let one more in)."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(hashtext('fine-tunes:' || :tenant))"),
        {"tenant": str(tenant_id)},
    )
    active = await active_count(session, tenant_id)
    if active >= max_active:
        raise LimitReached(active)
    job = FineTune(
        id=job_id,
        tenant_id=tenant_id,
        api_key_id=api_key_id,
        model=model,
        status=QUEUED,
        params=params,
        dataset_key=dataset_key,
        dataset_images=dataset_images,
        dataset_bytes=dataset_bytes,
        step=0,
        checkpoint_step=0,
        gpu_seconds=0.0,
        attempts=0,
        cancel_requested=False,
    )
    session.add(job)
    await session.flush()
    return job


async def active_count(session: AsyncSession, tenant_id: uuid.UUID) -> int:
    """The tenant's fine-tunes queued or running."""
    return await session.scalar(
        select(func.count())
        .select_from(FineTune)
        .where(FineTune.tenant_id == tenant_id, FineTune.status.in_(ACTIVE))
    )


async def get(session: AsyncSession, tenant_id: uuid.UUID, job_id: str) -> FineTune | None:
    return await session.scalar(
        select(FineTune).where(FineTune.id == job_id, FineTune.tenant_id == tenant_id)
    )


async def list_for(
    session: AsyncSession, tenant_id: uuid.UUID, limit: int, after: FineTune | None = None
) -> list[FineTune]:
    """The tenant's jobs, newest first (then by id), after the job `after`."""
    place = tuple_(FineTune.created_at, FineTune.id)
    query = select(FineTune).where(FineTune.tenant_id == tenant_id)
    if after is not None:
        query = query.where(place < tuple_(after.created_at, after.id))
    order = (FineTune.created_at.desc(), FineTune.id.desc())
    return list(await session.scalars(query.order_by(*order).limit(limit)))


async def segments(session: AsyncSession, job_id: str) -> list[FineTuneSegment]:
    rows = await session.scalars(
        select(FineTuneSegment)
        .where(FineTuneSegment.fine_tune_id == job_id)
        .order_by(FineTuneSegment.from_step)
    )
    return list(rows)


async def request_cancel(session: AsyncSession, job: FineTune) -> None:
    """A queued job is cancelled at once (its worker will skip it); a running one is asked
    to stop, and stops at its next step (billed for the steps it ran)."""
    if job.status == QUEUED:
        job.status = CANCELLED
        job.finished_at = datetime.now(UTC)
    elif job.status == RUNNING:
        job.cancel_requested = True
    await session.flush()


async def get_adapter(session: AsyncSession, tenant_id: uuid.UUID, adapter_id: str):
    return await session.scalar(
        select(Adapter).where(Adapter.id == adapter_id, Adapter.tenant_id == tenant_id)
    )


async def list_adapters(session: AsyncSession, tenant_id: uuid.UUID) -> list[Adapter]:
    rows = await session.scalars(
        select(Adapter).where(Adapter.tenant_id == tenant_id).order_by(Adapter.created_at.desc())
    )
    return list(rows)


async def delete_adapter(session: AsyncSession, adapter: Adapter) -> None:
    await session.delete(adapter)
    await session.flush()


# -- the train worker ------------------------------------------------------------------------


def take(session: Session, job_id: str, worker: str) -> FineTune | None:
    """Start the job on this worker if it is queued (whoever takes it first runs it)."""
    now = datetime.now(UTC)
    taken = session.execute(
        update(FineTune)
        .where(FineTune.id == job_id, FineTune.status == QUEUED)
        .values(
            status=RUNNING,
            worker=worker,
            heartbeat_at=now,
            attempts=FineTune.attempts + 1,
            started_at=func.coalesce(FineTune.started_at, now),
        )
        .returning(FineTune.id)
    ).scalar()
    return session.get(FineTune, job_id) if taken else None


def progress(session: Session, job_id: str, worker: str, step: int, loss: float) -> bool:
    """Record a step; True when the job should stop (cancelled, or taken by another worker
    after this one was presumed lost)."""
    row = session.execute(
        update(FineTune)
        .where(FineTune.id == job_id)
        .values(step=step, loss=loss, heartbeat_at=datetime.now(UTC))
        .returning(FineTune.cancel_requested, FineTune.worker, FineTune.status)
    ).one()
    return row.cancel_requested or row.worker != worker or row.status != RUNNING


def keep_checkpoint(
    session: Session,
    job: FineTune,
    *,
    key: str,
    from_step: int,
    to_step: int,
    gpu_seconds: float,
    loss: float,
) -> None:
    """Steps [from_step, to_step) are kept: the checkpoint a later run resumes from, and the
    segment that bills them (once: a segment is keyed by where it starts)."""
    session.add(
        FineTuneSegment(
            fine_tune_id=job.id,
            from_step=from_step,
            to_step=to_step,
            gpu_seconds=gpu_seconds,
            loss=loss,
            attempt=job.attempts,
        )
    )
    job.checkpoint_step = to_step
    job.checkpoint_key = key
    job.gpu_seconds = job.gpu_seconds + gpu_seconds
    job.heartbeat_at = datetime.now(UTC)


def finish(
    session: Session,
    job: FineTune,
    status: str,
    *,
    adapter: Adapter | None = None,
    error: str | None = None,
) -> bool:
    """End the job. Succeeded or cancelled: the steps kept are billed, one usage record.
    Failed (the platform's fault): not billed. False if already recorded."""
    now = datetime.now(UTC)
    job.status = status
    job.finished_at = now
    job.error = error
    job.heartbeat_at = now
    if adapter is not None:
        session.add(adapter)
        job.adapter_id = adapter.id
    if status == FAILED:
        return True
    return usage.record(
        session,
        usage.UsageCreate(
            request_id=job.id,
            tenant_id=job.tenant_id,
            api_key_id=job.api_key_id,
            model=job.model,
            kind=KIND,
            status="completed" if status == SUCCEEDED else "cancelled",
            gpu_seconds=job.gpu_seconds,
            queue_seconds=max(0.0, (job.started_at - job.created_at).total_seconds()),
            prompt_tokens=0,
            output_tokens=0,
            started_at=job.started_at,
            finished_at=now,
        ),
    )


def orphans(session: Session, stale_seconds: float) -> list[str]:
    """Running jobs whose worker stopped reporting: queued again, to resume from their last
    checkpoint on whichever worker takes them."""
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=stale_seconds)
    rows = session.execute(
        update(FineTune)
        .where(FineTune.status == RUNNING, FineTune.heartbeat_at < cutoff)
        .values(status=QUEUED, worker=None, heartbeat_at=now)  # sent again now
        .returning(FineTune.id)
    ).scalars()
    return list(rows)


def unclaimed(session: Session, stale_seconds: float) -> list[str]:
    """Queued jobs that no worker took within `stale_seconds` of their last enqueue: asked by
    an idle worker, which would have received their messages, so the broker lost them (a
    Redis restart without persistence, say). Marked as sent again now; the caller sends them
    (a duplicate delivery is harmless: `take` starts a job once)."""
    now = datetime.now(UTC)
    cutoff = now - timedelta(seconds=stale_seconds)
    rows = session.execute(
        update(FineTune)
        .where(
            FineTune.status == QUEUED,
            func.coalesce(FineTune.heartbeat_at, FineTune.created_at) < cutoff,
        )
        .values(heartbeat_at=now)
        .returning(FineTune.id)
    ).scalars()
    return list(rows)
