"""The operator's HTTP API (`/admin/...`): tenants, tiers, keys, usage, and the audit log.

Behind the admin token (`GPUHOST_ADMIN_TOKEN`, sent as `Authorization: Bearer <token>`); tenant
keys are refused. Every change is written to the audit log in the change's own transaction:
who (the token's holder as the `X-Actor` header names them, else "admin"), what, on what,
when, and from which address.
"""

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field
from sqlalchemy.orm import Session

from api.access import revocations
from api.deps import SessionDep, StateDep, bearer, client_address, is_admin_token
from api.errors import Forbidden, Unauthorized
from api.operator.changes import run_change, run_committed
from billing import operator, tenants, usage
from billing.keys import well_formed
from billing.models import ApiKey, Tenant
from billing.plans import period_of

router = APIRouter(prefix="/admin", tags=["admin"])


async def _require_admin(request: Request, state: StateDep) -> str:
    """The actor's name, once the admin token checks out (failures are throttled)."""
    if not state.settings.admin_token:
        raise Forbidden("the admin API is off: set GPUHOST_ADMIN_TOKEN to turn it on")
    presented = bearer(request.headers.get("authorization", ""))
    if not presented:
        raise Unauthorized("missing admin token: send 'Authorization: Bearer <admin token>'")
    if is_admin_token(state.settings, presented):
        return (request.headers.get("x-actor") or "admin")[:200]
    if well_formed(presented):
        raise Forbidden("operator routes need the admin token; tenant API keys are refused")
    refused = Unauthorized("invalid admin token")
    raise await state.throttle.failed(client_address(request.scope)) or refused


Actor = Annotated[str, Depends(_require_admin)]


def _client(request: Request) -> str | None:
    return request.client.host if request.client else None


def who(request: Request, actor: str) -> tuple[str, str | None]:
    """The actor and the address an operator action came from, for the audit log."""
    return actor, _client(request)


def _tenant_json(tenant: Tenant, used: float | None = None, in_flight: int | None = None):
    body = {
        "id": str(tenant.id),
        "name": tenant.name,
        "tier": tenant.tier,
        "created_at": tenant.created_at,
        "stripe_customer_id": tenant.stripe_customer_id,
    }
    if used is not None:
        body["gpu_seconds_this_period"] = round(used, 3)
    if in_flight is not None:
        body["in_flight"] = in_flight
    return body


def _key_json(row: ApiKey) -> dict:
    return {
        "id": str(row.id),
        "tenant_id": str(row.tenant_id),
        "prefix": row.prefix,
        "last_four": row.last_four,
        "scopes": list(row.scopes),
        "created_at": row.created_at,
        "expires_at": row.expires_at,
        "revoked_at": row.revoked_at,
        "last_used_at": row.last_used_at,
    }


class TenantCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200)
    tier: str = "free"


class TenantUpdate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    tier: str


class KeyCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    scopes: list[str] = Field(default_factory=lambda: list(tenants.DEFAULT_SCOPES))
    expires_in_days: float | None = Field(default=None, gt=0, le=3650)


@router.get("/tenants")
async def list_tenants(state: StateDep, session: SessionDep, actor: Actor) -> dict:
    """Every tenant with its tier, GPU-seconds this billing period and requests in flight."""
    period = period_of(datetime.now(UTC))
    used = await usage.used_by_tenant(session, period)
    rows = await tenants.all_tenants(session)
    return {
        "period_start": period.start,
        "period_end": period.end,
        "tenants": [
            _tenant_json(t, used.get(t.id, 0.0), held)
            for t, held in zip(
                rows, await state.admission.in_flight_of([t.id for t in rows]), strict=True
            )
        ],
    }


@router.post("/tenants", status_code=201)
async def create_tenant(
    body: TenantCreate, request: Request, state: StateDep, session: SessionDep, actor: Actor
) -> dict:
    def work(session: Session):
        tenant = operator.create_tenant(
            session, who(request, actor), body.name, body.tier, state.settings.tier_limits
        )
        session.flush()
        session.refresh(tenant)
        return _tenant_json(tenant)

    return await run_change(session, work)


@router.get("/tenants/{tenant_id}")
async def get_tenant(tenant_id: str, state: StateDep, session: SessionDep, actor: Actor) -> dict:
    def work(session: Session):
        tenant = tenants.get_tenant(session, tenant_id)
        return tenant, [_key_json(k) for k in tenants.keys_of(session, tenant.id)]

    tenant, keys = await run_change(session, work)
    view = await usage.admission_view(session, tenant.id, period_of(datetime.now(UTC)))
    used = view[1] if view else 0.0
    return _tenant_json(tenant, used, await state.admission.in_flight(tenant.id)) | {
        "limit": state.settings.tier_limits.get(tenant.tier),
        "keys": keys,
    }


@router.patch("/tenants/{tenant_id}")
async def update_tenant(
    tenant_id: str, body: TenantUpdate, request: Request, state: StateDep, actor: Actor
) -> dict:
    """Move a tenant to another tier: its next request is admitted on the new tier (through
    this gateway; through the others an upgrade at once, a downgrade within their quota cache
    time, `api.access.quota`)."""

    def work(session: Session):
        tenant = operator.set_tier(
            session, who(request, actor), tenant_id, body.tier, state.settings.tier_limits
        )
        return _tenant_json(tenant)

    changed = await run_committed(state, work)
    state.quotas.forget(changed["id"])
    return changed


@router.get("/tenants/{tenant_id}/keys")
async def list_keys(tenant_id: str, session: SessionDep, actor: Actor) -> dict:
    def work(session: Session):
        tenant = tenants.get_tenant(session, tenant_id)
        return {"keys": [_key_json(k) for k in tenants.keys_of(session, tenant.id)]}

    return await run_change(session, work)


@router.post("/tenants/{tenant_id}/keys", status_code=201)
async def create_key(
    tenant_id: str, body: KeyCreate, request: Request, session: SessionDep, actor: Actor
) -> dict:
    """A new key for the tenant. `key` is in this response only: it is never stored."""
    expires = (
        datetime.now(UTC) + timedelta(days=body.expires_in_days) if body.expires_in_days else None
    )

    def work(session: Session):
        row, secret = operator.issue_key(
            session, who(request, actor), tenant_id, tuple(body.scopes), expires
        )
        session.flush()
        session.refresh(row)
        return _key_json(row) | {"key": secret}

    return await run_change(session, work)


@router.delete("/keys/{key_id}")
async def revoke_key(key_id: str, request: Request, state: StateDep, actor: Actor) -> dict:
    """Revoke a key: every gateway refuses it as soon as it hears (api/access/revocations.py)."""

    def work(session: Session):
        return _key_json(operator.revoke_key(session, who(request, actor), key_id))

    revoked = await run_committed(state, work)
    await revocations.announce(state, revoked["id"])
    return revoked


@router.get("/usage")
async def usage_records(
    session: SessionDep,
    actor: Actor,
    tenant: Annotated[str, Query(description="tenant id")],
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
) -> dict:
    def work(session: Session):
        found = tenants.get_tenant(session, tenant)
        return [usage.to_dict(r) for r in usage.for_tenant(session, found.id, limit)]

    return {"tenant_id": tenant, "records": await run_change(session, work)}


@router.get("/outbox")
async def outbox(session: SessionDep, actor: Actor) -> dict:
    """How far usage lags on its way to Stripe."""
    unsent, lag = await usage.outbox_backlog(session)
    return {"unsent": unsent, "oldest_unsent_seconds": round(lag, 3)}


@router.get("/audit")
async def audit_log(
    session: SessionDep,
    actor: Actor,
    limit: Annotated[int, Query(ge=1, le=1000)] = 100,
    target: Annotated[str | None, Query(description="only entries about this id")] = None,
) -> dict:
    rows = await operator.audit_entries(session, limit, target)
    return {
        "entries": [
            {
                "id": r.id,
                "at": r.at,
                "actor": r.actor,
                "action": r.action,
                "target": r.target,
                "detail": r.detail,
                "client": r.client,
            }
            for r in rows
        ]
    }
