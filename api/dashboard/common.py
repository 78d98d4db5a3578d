"""What the dashboard's pages share: the router and templates, who is signed in (sessions in
Redis), the checks every page and form makes, and the errors pages render."""

import hmac
import json
import uuid
from dataclasses import dataclass, replace
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse
from fastapi.templating import Jinja2Templates
from sqlalchemy.ext.asyncio import AsyncSession

from api.access import revocations
from api.deps import SessionDep, StateDep
from api.errors import ApiError
from api.operator.admin import who
from api.operator.changes import run_change, run_committed
from api.state import AppState
from billing import operator, tenants
from billing.models import ApiKey
from billing.plans import Balance
from workers.keyspace import dashboard_session_key

HERE = Path(__file__).parent
STATIC = HERE / "static"
templates = Jinja2Templates(directory=HERE / "templates")
router = APIRouter(prefix="/dashboard", include_in_schema=False)

COOKIE = "gpuhost_session"
SESSION_SECONDS = 8 * 3600
PAGE_SIZE = 25
RANGES = {
    "24h": (timedelta(hours=24), "hour"),
    "7d": (timedelta(days=7), "day"),
    "30d": (timedelta(days=30), "day"),
}


@dataclass(frozen=True)
class Visitor:
    kind: str  # tenant | operator
    csrf: str
    token: str  # the session's id (the cookie's value)
    tenant_id: uuid.UUID | None = None
    key_id: uuid.UUID | None = None
    scopes: tuple[str, ...] = ()  # a tenant session's: its key's, as they are now

    def may_manage_keys(self) -> bool:
        return tenants.KEYS_WRITE in self.scopes


class SignInRequired(ApiError):
    status = 303


class PageError(ApiError):
    """Rendered as the error page with its status."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


class NotAllowed(PageError):
    def __init__(self, message: str):
        super().__init__(403, message)


def secure(request: Request) -> bool:
    return request.url.scheme == "https"


def render(
    request: Request, name: str, status: int = 200, headers: dict | None = None, **context
) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status, headers=headers)


async def visitor_of(request: Request, state: StateDep, session: SessionDep) -> Visitor:
    token = request.cookies.get(COOKIE, "")
    raw = await state.redis.get(dashboard_session_key(token)) if token else None
    if raw is None:
        raise SignInRequired("sign in first")
    data = json.loads(raw)
    visitor = Visitor(
        kind=data["kind"],
        csrf=data["csrf"],
        token=token,
        tenant_id=uuid.UUID(data["tenant_id"]) if data.get("tenant_id") else None,
        key_id=uuid.UUID(data["key_id"]) if data.get("key_id") else None,
    )
    if visitor.kind == "tenant":
        key = await session.get(ApiKey, visitor.key_id)
        now = datetime.now(UTC)
        if key is None or key.revoked_at or (key.expires_at and key.expires_at <= now):
            await state.redis.delete(dashboard_session_key(token))
            raise SignInRequired("the key this session was opened with is no longer valid")
        visitor = replace(visitor, scopes=tuple(key.scopes))
    return visitor


VisitorDep = Annotated[Visitor, Depends(visitor_of)]


def tenant_of(visitor: Visitor) -> uuid.UUID:
    if visitor.kind != "tenant":
        raise NotAllowed("these pages are a tenant's: sign in with an API key")
    return visitor.tenant_id


def key_manager_of(visitor: Visitor) -> uuid.UUID:
    """The tenant whose keys this session may make and revoke (its key has `keys:write`)."""
    tenant_id = tenant_of(visitor)
    if not visitor.may_manage_keys():
        raise NotAllowed(
            f"the key this session was opened with lacks the '{tenants.KEYS_WRITE}' scope: "
            "it cannot make or revoke keys"
        )
    return tenant_id


def who_of(request: Request, actor: str = "dashboard (admin token)") -> tuple[str, str | None]:
    return who(request, actor)


def operator_only(visitor: Visitor) -> None:
    if visitor.kind != "operator":
        raise NotAllowed("operator pages need the admin token; tenant keys are refused")


async def check_csrf(visitor: Visitor, csrf: str) -> None:
    if not hmac.compare_digest(visitor.csrf.encode(), csrf.encode()):
        raise NotAllowed("this form has expired or did not come from this dashboard; reload")


def invoice(balance: Balance) -> dict:
    return {
        "monthly": f"{balance.plan.monthly_price_usd:,.2f}",
        "overage": f"{balance.overage_usd:,.2f}",
        "total": f"{balance.total_usd:,.2f}",
    }


async def tenant_keys(session: AsyncSession, tenant_id: uuid.UUID) -> list[ApiKey]:
    return await session.run_sync(lambda s: tenants.keys_of(s, tenant_id))


async def page_change(session: AsyncSession, work, failed_status: int = 400):
    """A change with its audit entry in the page's transaction; returns what `work` returns.
    A refused change is the error page, with `failed_status`."""
    return await run_change(session, work, lambda _, message: PageError(failed_status, message))


async def page_change_committed(state: AppState, work, failed_status: int = 400):
    """`page_change` in a transaction of its own, committed when this returns: for a change
    whose caches must be dropped only once it is committed."""
    refused = lambda _, message: PageError(failed_status, message)  # noqa: E731
    return await run_committed(state, work, refused)


async def issue_key(
    session: AsyncSession, request: Request, actor: str, tenant_id, scopes: tuple[str, ...]
) -> str:
    """A new key for the tenant, audited as `actor`'s (from the dashboard, by the tenant or
    the operator); its secret, shown once. PageError 400 if no scope, or one unknown."""
    if not scopes:
        raise PageError(400, "Choose at least one scope.")
    who = who_of(request, actor)
    _, secret = await page_change(session, lambda s: operator.issue_key(s, who, tenant_id, scopes))
    return secret


async def revoke_key(
    state: AppState, request: Request, actor: str, key_id: str, tenant_id=None
) -> ApiKey:
    """Revoke a key (only one of `tenant_id`'s, when given; another is not found), audited as
    `actor`'s, in a transaction of its own: every gateway drops it once it is committed."""
    who = who_of(request, actor)
    revoke = lambda s: operator.revoke_key(s, who, key_id, tenant_id=tenant_id)  # noqa: E731
    row = await page_change_committed(state, revoke, 404)
    await revocations.announce(state, row.id)
    return row
