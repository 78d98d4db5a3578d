"""Tenants and their API keys: the admin operations and the gateway's key lookup."""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime

from sqlalchemy import select, update
from sqlalchemy.ext.asyncio import AsyncSession
from sqlalchemy.orm import Session

from billing import keys
from billing.models import ApiKey, Tenant

# What a key may do: call the models; read its tenant's usage (and sign in to the dashboard);
# make and revoke its tenant's keys, with no more scopes than its own (the dashboard's keys page).
INFERENCE, USAGE_READ, KEYS_WRITE = "inference", "usage:read", "keys:write"
DEFAULT_SCOPES = (INFERENCE, USAGE_READ, KEYS_WRITE)
KNOWN_SCOPES = frozenset(DEFAULT_SCOPES)


class Unknown(LookupError):
    """No such tenant or key."""


class InvalidArgument(ValueError):
    """A value an admin gave is not acceptable; the message says which and why."""


@dataclass(frozen=True)
class KeyOwner:
    """What the gateway needs to know about the holder of a valid key."""

    key_id: uuid.UUID
    tenant_id: uuid.UUID
    tier: str
    scopes: tuple[str, ...]
    expires_at: datetime | None = None  # the key stops at this instant, cached or not

    def expired(self, now: datetime) -> bool:
        return self.expires_at is not None and self.expires_at <= now


def _parse_id(value: str | uuid.UUID, what: str) -> uuid.UUID:
    try:
        return value if isinstance(value, uuid.UUID) else uuid.UUID(value)
    except ValueError:
        raise InvalidArgument(f"{what} {value!r} is not a valid id (expected a UUID)") from None


def _check_tier(tier: str, tiers: dict[str, int]) -> str:
    if tier not in tiers:
        raise InvalidArgument(f"unknown tier {tier!r}; known tiers: {', '.join(tiers)}")
    return tier


NAME_MAX = 200  # the column's width


def create_tenant(session: Session, name: str, tier: str, tiers: dict[str, int]) -> Tenant:
    if not name.strip():
        raise InvalidArgument("tenant name must not be empty")
    if any(ord(c) < 32 or ord(c) == 127 for c in name):
        raise InvalidArgument("tenant name must not contain control characters")
    if len(name.strip()) > NAME_MAX:
        raise InvalidArgument(
            f"tenant name is {len(name.strip())} characters; at most {NAME_MAX} are allowed"
        )
    tenant = Tenant(id=uuid.uuid4(), name=name.strip(), tier=_check_tier(tier, tiers))
    session.add(tenant)
    session.flush()
    return tenant


def get_tenant(session: Session, tenant_id: str | uuid.UUID) -> Tenant:
    tenant = session.get(Tenant, _parse_id(tenant_id, "tenant"))
    if tenant is None:
        raise Unknown(f"tenant {tenant_id} not found")
    return tenant


def set_tier(session: Session, tenant_id: str, tier: str, tiers: dict[str, int]) -> Tenant:
    tenant = get_tenant(session, tenant_id)
    tenant.tier = _check_tier(tier, tiers)
    session.flush()
    return tenant


def create_key(
    session: Session,
    tenant_id: str | uuid.UUID,
    scopes: tuple[str, ...] = DEFAULT_SCOPES,
    expires_at: datetime | None = None,
) -> tuple[ApiKey, str]:
    """Make a key for the tenant; returns the row and the secret (shown once)."""
    tenant = get_tenant(session, tenant_id)
    unknown = set(scopes) - KNOWN_SCOPES
    if unknown:
        raise InvalidArgument(
            f"unknown scope(s) {', '.join(sorted(unknown))}; "
            f"known: {', '.join(sorted(KNOWN_SCOPES))}"
        )
    new = keys.generate()
    row = ApiKey(
        id=uuid.uuid4(),
        tenant_id=tenant.id,
        key_hash=new.sha256,
        prefix=new.prefix,
        last_four=new.last_four,
        scopes=list(scopes),
        expires_at=expires_at,
    )
    session.add(row)
    session.flush()
    return row, new.secret


EVERY_TENANT = select(Tenant).order_by(Tenant.created_at)


async def all_tenants(session: AsyncSession) -> list[Tenant]:
    """Every tenant, oldest first."""
    return list((await session.scalars(EVERY_TENANT)).all())


def all_tenants_sync(session: Session) -> list[Tenant]:
    """Every tenant, oldest first (the command line's synchronous session)."""
    return list(session.scalars(EVERY_TENANT).all())


def keys_of(session: Session, tenant_id: uuid.UUID) -> list[ApiKey]:
    """The tenant's keys, oldest first (revoked ones too)."""
    return list(
        session.scalars(
            select(ApiKey).where(ApiKey.tenant_id == tenant_id).order_by(ApiKey.created_at)
        )
    )


def revoke_key(session: Session, key_id: str, tenant_id: uuid.UUID | None = None) -> ApiKey:
    """Revoke a key (again: nothing changes). With `tenant_id`, only a key of that tenant: any
    other is not found."""
    row = session.get(ApiKey, _parse_id(key_id, "key"))
    if row is None or (tenant_id is not None and row.tenant_id != tenant_id):
        raise Unknown(f"key {key_id} not found")
    if row.revoked_at is None:
        row.revoked_at = datetime.now(UTC)
        session.flush()
    return row


async def owner_of_key(session: AsyncSession, presented: str) -> KeyOwner | None:
    """The owner of a live key (not revoked, not expired), or None."""
    if not keys.well_formed(presented):
        return None
    digest = keys.hash_key(presented)
    row = (
        await session.execute(
            select(
                ApiKey.id,
                ApiKey.key_hash,
                ApiKey.scopes,
                ApiKey.expires_at,
                ApiKey.revoked_at,
                Tenant.id,
                Tenant.tier,
            )
            .join(Tenant, Tenant.id == ApiKey.tenant_id)
            .where(ApiKey.key_hash == digest)
        )
    ).first()
    if row is None or not keys.matches(presented, row[1]):
        return None
    key_id, _, scopes, expires_at, revoked_at, tenant_id, tier = row
    now = datetime.now(UTC)
    if revoked_at is not None or (expires_at is not None and expires_at <= now):
        return None
    await session.execute(update(ApiKey).where(ApiKey.id == key_id).values(last_used_at=now))
    return KeyOwner(
        key_id=key_id,
        tenant_id=tenant_id,
        tier=tier,
        scopes=tuple(scopes),
        expires_at=expires_at,
    )
