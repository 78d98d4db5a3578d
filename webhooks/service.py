"""Every statement about webhook secrets and deliveries. Callers own the transaction."""

import base64
import json
import secrets
import uuid
from collections.abc import Collection
from datetime import UTC, datetime, timedelta

from sqlalchemy import func, select, update
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from webhooks.models import DELIVERED, FAILED, PENDING, WebhookDelivery, WebhookSecret


async def secret_of(session: AsyncSession, tenant_id: uuid.UUID) -> str:
    """The tenant's signing secret (`whsec_` + base64 of 32 random bytes), made on first use
    (a read for every delivery after that; two makers at once keep the first one's)."""
    query = select(WebhookSecret.secret).where(WebhookSecret.tenant_id == tenant_id)
    secret = await session.scalar(query)
    if secret is None:
        await session.execute(
            insert(WebhookSecret)
            .values(tenant_id=tenant_id, secret=_fresh_secret())
            .on_conflict_do_nothing(index_elements=["tenant_id"])
        )
        secret = await session.scalar(query)
    return secret


def _fresh_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


async def rotate_secret(session: AsyncSession, tenant_id: uuid.UUID) -> str:
    await session.execute(
        update(WebhookSecret)
        .where(WebhookSecret.tenant_id == tenant_id)
        .values(secret=_fresh_secret())
    )
    return await secret_of(session, tenant_id)


async def record(
    session: AsyncSession, tenant_id: uuid.UUID, job_id: str, event: str, url: str, payload: dict
) -> None:
    """An event to deliver; once per job and event, however many gateways see it. Its body
    is fixed now, as JSON text."""
    await session.execute(
        insert(WebhookDelivery)
        .values(
            id=uuid.uuid4(),
            tenant_id=tenant_id,
            job_id=job_id,
            event=event,
            url=url,
            body=json.dumps(payload, separators=(",", ":")),
            status=PENDING,
            attempts=0,
            created_at=func.clock_timestamp(),  # events of one transaction keep their order
        )
        .on_conflict_do_nothing(index_elements=["job_id", "event"])
    )


async def claim_due(
    session: AsyncSession,
    limit: int,
    lease_seconds: float,
    per_tenant: int | None = None,
    busy_tenants: Collection[uuid.UUID] = (),
) -> list:
    """Pending deliveries due now, claimed for `lease_seconds` (other gateways skip them
    meanwhile; if this one dies, they are due again after it): at most `per_tenant` of one
    tenant's, none of `busy_tenants`'."""
    now = datetime.now(UTC)
    waiting = [WebhookDelivery.status == PENDING, WebhookDelivery.next_attempt_at <= now]
    if busy_tenants:
        waiting.append(WebhookDelivery.tenant_id.not_in(list(busy_tenants)))
    order = (WebhookDelivery.next_attempt_at, WebhookDelivery.created_at)
    if per_tenant is None:
        candidates = select(WebhookDelivery.id).where(*waiting)
    else:
        rank = func.row_number().over(partition_by=WebhookDelivery.tenant_id, order_by=order)
        ranked = select(WebhookDelivery.id, rank.label("rank")).where(*waiting).subquery()
        candidates = select(WebhookDelivery.id).where(
            WebhookDelivery.id.in_(select(ranked.c.id).where(ranked.c.rank <= per_tenant))
        )
    due = candidates.order_by(*order).limit(limit).with_for_update(skip_locked=True)
    rows = await session.scalars(
        update(WebhookDelivery)
        .where(WebhookDelivery.id.in_(due.scalar_subquery()))
        .values(next_attempt_at=now + timedelta(seconds=lease_seconds))
        .returning(WebhookDelivery)
    )
    return sorted(rows, key=lambda d: d.created_at)


async def attempted(
    session: AsyncSession,
    delivery_id: uuid.UUID,
    *,
    status_code: int | None,
    error: str | None,
    max_attempts: int,
    backoff_base: float,
    backoff_cap: float,
) -> str:
    """Record an attempt: delivered on 2xx, else retried after a backoff, or given up."""
    delivery = await session.get(WebhookDelivery, delivery_id, with_for_update=True)
    now = datetime.now(UTC)
    delivery.attempts += 1
    delivery.last_status_code = status_code
    delivery.last_error = error
    if status_code is not None and 200 <= status_code < 300:
        delivery.status, delivery.delivered_at = DELIVERED, now
    elif delivery.attempts >= max_attempts:
        delivery.status = FAILED
    else:
        wait = min(backoff_cap, backoff_base * 2 ** (delivery.attempts - 1))
        delivery.next_attempt_at = now + timedelta(seconds=wait)
    return delivery.status


async def of_job(session: AsyncSession, tenant_id: uuid.UUID, job_id: str) -> list:
    rows = await session.scalars(
        select(WebhookDelivery)
        .where(WebhookDelivery.tenant_id == tenant_id, WebhookDelivery.job_id == job_id)
        .order_by(WebhookDelivery.created_at)
    )
    return list(rows)
