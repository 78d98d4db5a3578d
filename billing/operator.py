"""An operator's changes to tenants and keys, each with its audit-log entry in the same
transaction: the one place the admin API and the dashboard's operator pages make them."""

import uuid
from datetime import datetime

from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from billing import tenants
from billing.models import ApiKey, AuditEntry, Tenant


def _audit(session: Session, who: tuple[str, str | None], action: str, target, **detail) -> None:
    actor, client = who
    session.add(
        AuditEntry(actor=actor, action=action, target=str(target), detail=detail, client=client)
    )


def create_tenant(
    session: Session, who: tuple[str, str | None], name: str, tier: str, tiers: dict[str, int]
) -> Tenant:
    """`who`: (the actor's name, the address the action came from)."""
    tenant = tenants.create_tenant(session, name, tier, tiers)
    _audit(session, who, "tenant.create", tenant.id, name=tenant.name, tier=tenant.tier)
    return tenant


def set_tier(
    session: Session,
    who: tuple[str, str | None],
    tenant_id: str | uuid.UUID,
    tier: str,
    tiers: dict[str, int],
) -> Tenant:
    before = tenants.get_tenant(session, tenant_id).tier
    tenant = tenants.set_tier(session, str(tenant_id), tier, tiers)
    _audit(session, who, "tenant.set_tier", tenant.id, before=before, after=tenant.tier)
    return tenant


def issue_key(
    session: Session,
    who: tuple[str, str | None],
    tenant_id: str | uuid.UUID,
    scopes: tuple[str, ...],
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """A new key and its secret (never logged, shown once)."""
    row, secret = tenants.create_key(session, tenant_id, scopes, expires_at)
    _audit(
        session,
        who,
        "key.create",
        row.id,
        tenant_id=str(row.tenant_id),
        scopes=list(row.scopes),
        prefix=row.prefix,
        last_four=row.last_four,
    )
    return row, secret


def revoke_key(
    session: Session,
    who: tuple[str, str | None],
    key_id: str,
    tenant_id: uuid.UUID | None = None,
) -> ApiKey:
    """Every revocation, by an operator or by the key's own tenant (`tenant_id`: only its
    keys), is audited here. The gateway then drops that key from its cache (AppState.forget_key)."""
    row = tenants.revoke_key(session, key_id, tenant_id)
    _audit(session, who, "key.revoke", row.id, tenant_id=str(row.tenant_id))
    return row


async def audit_entries(session: AsyncSession, limit: int, target: str | None) -> list[AuditEntry]:
    """The newest entries of the audit log first; with `target`, only those about that id."""
    query = select(AuditEntry).order_by(AuditEntry.id.desc()).limit(limit)
    if target:
        query = query.where(AuditEntry.target == target)
    return list((await session.scalars(query)).all())
