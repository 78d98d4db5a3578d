"""The billing dashboard, server-rendered under /dashboard.

Tenants sign in with an API key that has the `usage:read` scope and see their plan, allowance,
GPU-seconds by model over time, their requests, the period's estimated invoice, and their
keys. Operators sign in with the admin token and see every tenant, change tiers, issue and
revoke keys (each action in the audit log, as through /admin).

Sessions live in Redis (`dashboard:session:<random>`), named by an HttpOnly, SameSite=Strict
cookie (Secure when served over HTTPS); every form carries the session's CSRF token. A tenant
session ends as soon as the key it was opened with is revoked or expires.
"""

import hmac
import json
import secrets
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Annotated

from fastapi import APIRouter, Depends, Form, Query, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response
from fastapi.templating import Jinja2Templates
from sqlalchemy import func, select
from sqlalchemy.orm import Session

from api.admin import who
from api.deps import StateDep
from api.errors import ApiError
from api.state import AppState
from billing import operator, tenants, usage
from billing.keys import PREFIX, well_formed
from billing.models import ApiKey, Tenant, UsageRecord
from billing.plans import Balance, period_of

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


class SignInRequired(ApiError):
    status = 303


class NotAllowed(ApiError):
    status = 403


def _session_key(token: str) -> str:
    return f"dashboard:session:{token}"


def _secure(request: Request) -> bool:
    return request.url.scheme == "https"


def render(request: Request, name: str, status: int = 200, **context) -> HTMLResponse:
    return templates.TemplateResponse(request, name, context, status_code=status)


async def _visitor(request: Request, state: StateDep) -> Visitor:
    token = request.cookies.get(COOKIE, "")
    raw = await state.redis.get(_session_key(token)) if token else None
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
        async with state.sessions() as session:
            key = await session.get(ApiKey, visitor.key_id)
        now = datetime.now(UTC)
        if key is None or key.revoked_at or (key.expires_at and key.expires_at <= now):
            await state.redis.delete(_session_key(token))
            raise SignInRequired("the key this session was opened with is no longer valid")
    return visitor


VisitorDep = Annotated[Visitor, Depends(_visitor)]


def _tenant(visitor: Visitor) -> uuid.UUID:
    if visitor.kind != "tenant":
        raise NotAllowed("these pages are a tenant's: sign in with an API key")
    return visitor.tenant_id


def _who(request: Request) -> tuple[str, str | None]:
    return who(request, "dashboard (admin token)")


def _operator(visitor: Visitor) -> None:
    if visitor.kind != "operator":
        raise NotAllowed("operator pages need the admin token; tenant keys are refused")


async def _check_csrf(visitor: Visitor, csrf: str) -> None:
    if not hmac.compare_digest(visitor.csrf.encode(), csrf.encode()):
        raise NotAllowed("this form has expired or did not come from this dashboard; reload")


def install(app) -> None:
    """Routes, static files, and the handlers that turn errors into pages."""
    from fastapi.staticfiles import StaticFiles

    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")

    @app.exception_handler(SignInRequired)
    async def sign_in(request: Request, exc: SignInRequired) -> Response:
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(COOKIE, path="/dashboard")
        return response

    @app.exception_handler(NotAllowed)
    async def not_allowed(request: Request, exc: NotAllowed) -> Response:
        return render(request, "error.html", 403, message=exc.message)


# -- signing in and out ------------------------------------------------------------------------


@router.get("")
async def home(request: Request, state: StateDep) -> Response:
    visitor = await _visitor(request, state)
    target = "/dashboard/usage" if visitor.kind == "tenant" else "/dashboard/admin"
    return RedirectResponse(target, status_code=303)


@router.get("/login")
async def login_page(request: Request) -> Response:
    return render(request, "login.html")


@router.post("/login")
async def login(
    request: Request, state: StateDep, credential: Annotated[str, Form()] = ""
) -> Response:
    credential = credential.strip()
    session = {"csrf": secrets.token_urlsafe(24)}
    admin_token = state.settings.admin_token
    if admin_token and hmac.compare_digest(credential.encode(), admin_token.encode()):
        session["kind"] = "operator"
    elif credential.startswith(PREFIX):
        owner = None
        if well_formed(credential):
            async with state.sessions() as db:
                owner = await tenants.owner_of_key(db, credential)
        if owner is None:
            return render(request, "login.html", 401, error="That key is not valid.")
        if "usage:read" not in owner.scopes:
            return render(request, "login.html", 403, error="That key lacks the usage:read scope.")
        session |= {
            "kind": "tenant",
            "tenant_id": str(owner.tenant_id),
            "key_id": str(owner.key_id),
        }
    else:
        return render(
            request, "login.html", 401, error="Enter an API key (gph_...) or the admin token."
        )
    token = secrets.token_urlsafe(32)
    await state.redis.set(_session_key(token), json.dumps(session), ex=SESSION_SECONDS)
    target = "/dashboard/usage" if session["kind"] == "tenant" else "/dashboard/admin"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=_secure(request),
    )
    return response


@router.post("/logout")
async def logout(
    request: Request, state: StateDep, visitor: VisitorDep, csrf: Annotated[str, Form()] = ""
) -> Response:
    await _check_csrf(visitor, csrf)
    await state.redis.delete(_session_key(visitor.token))
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(COOKIE, path="/dashboard")
    return response


# -- a tenant's pages --------------------------------------------------------------------------


def _invoice(balance: Balance) -> dict:
    monthly = balance.plan.monthly_price_usd
    return {
        "monthly": f"{monthly:.2f}",
        "overage": f"{balance.overage_usd:.2f}",
        "total": f"{(monthly + balance.overage_usd).quantize(Decimal('0.01')):.2f}",
    }


@router.get("/usage")
async def usage_page(
    request: Request,
    state: StateDep,
    visitor: VisitorDep,
    range: Annotated[str, Query(pattern="^(24h|7d|30d)$")] = "7d",  # noqa: A002
    model: Annotated[str | None, Query(max_length=200)] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    tenant_id = _tenant(visitor)
    period = period_of(datetime.now(UTC))
    span, unit = RANGES[range]
    async with state.sessions() as session:
        tier, used = await usage.admission_view(session, tenant_id, period.start, period.end)
        tenant = await session.get(Tenant, tenant_id)
        series = await usage.model_buckets(session, tenant_id, datetime.now(UTC) - span, unit)
        rows, total, models = await usage.page(
            session, tenant_id, (page - 1) * PAGE_SIZE, PAGE_SIZE, model or None
        )
    plan = state.settings.plans[tier]
    balance = Balance(plan, period, used)
    chart = {"unit": unit, "series": {}}
    for start, name, seconds in series:
        chart["series"].setdefault(name, {})[start] = round(seconds, 3)
    return render(
        request,
        "usage.html",
        visitor=visitor,
        tenant=tenant,
        plan=plan,
        balance=balance.to_dict(),
        used_share=min(1.0, used / plan.included_gpu_seconds) if plan.included_gpu_seconds else 1.0,
        invoice=_invoice(balance),
        chart=chart,
        chart_total=round(sum(s for _, _, s in series), 3),
        range=range,
        ranges=list(RANGES),
        records=[usage.to_dict(r) for r in rows],
        total=total,
        page=page,
        pages=max(1, -(-total // PAGE_SIZE)),
        model=model or "",
        models=models,
    )


async def _tenant_keys(state: AppState, tenant_id: uuid.UUID) -> list[ApiKey]:
    async with state.sessions() as session:
        return await session.run_sync(lambda s: tenants.keys_of(s, tenant_id))


@router.get("/keys")
async def keys_page(request: Request, state: StateDep, visitor: VisitorDep) -> Response:
    tenant_id = _tenant(visitor)
    return render(
        request,
        "keys.html",
        visitor=visitor,
        keys=await _tenant_keys(state, tenant_id),
        scopes=sorted(tenants.KNOWN_SCOPES),
    )


@router.post("/keys")
async def create_key(
    request: Request,
    state: StateDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
    scope: Annotated[list[str] | None, Form()] = None,
) -> Response:
    tenant_id = _tenant(visitor)
    await _check_csrf(visitor, csrf)
    chosen = tuple(scope or ())
    error, secret = None, None
    if not chosen:
        error = "Choose at least one scope."
    else:
        try:
            async with state.sessions() as session, session.begin():
                row, secret = await session.run_sync(
                    lambda s: tenants.create_key(s, tenant_id, chosen)
                )
        except tenants.InvalidArgument as exc:
            error = str(exc)
    return render(
        request,
        "keys.html",
        400 if error else 201,
        visitor=visitor,
        keys=await _tenant_keys(state, tenant_id),
        scopes=sorted(tenants.KNOWN_SCOPES),
        error=error,
        new_key=secret,
    )


@router.post("/keys/{key_id}/revoke")
async def revoke_key(
    key_id: str,
    request: Request,
    state: StateDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    tenant_id = _tenant(visitor)
    await _check_csrf(visitor, csrf)
    try:
        wanted = uuid.UUID(key_id)
    except ValueError:
        wanted = None
    async with state.sessions() as session, session.begin():
        row = await session.get(ApiKey, wanted) if wanted else None
        if row is None or row.tenant_id != tenant_id:  # another tenant's key: not found
            return render(request, "error.html", 404, message=f"key {key_id} not found")
        if row.revoked_at is None:
            row.revoked_at = datetime.now(UTC)
    state.key_cache.clear()
    return RedirectResponse("/dashboard/keys", status_code=303)


# -- the operator's pages ----------------------------------------------------------------------


@router.get("/admin")
async def admin_page(request: Request, state: StateDep, visitor: VisitorDep) -> Response:
    _operator(visitor)
    period = period_of(datetime.now(UTC))
    in_period = (UsageRecord.finished_at >= period.start, UsageRecord.finished_at < period.end)
    async with state.sessions() as session:
        rows = (await session.scalars(select(Tenant).order_by(Tenant.created_at))).all()
        used = await usage.used_by_tenant(session, period.start, period.end)
        by_model = (
            await session.execute(
                select(UsageRecord.model, func.sum(UsageRecord.gpu_seconds))
                .where(*in_period)
                .group_by(UsageRecord.model)
                .order_by(UsageRecord.model)
            )
        ).all()
        unsent, lag = await usage.outbox_backlog(session)
    listed = []
    revenue = Decimal(0)
    for tenant in rows:
        plan = state.settings.plans.get(tenant.tier)
        seconds = float(used.get(tenant.id, 0.0))
        invoice = _invoice(Balance(plan, period, seconds)) if plan else None
        revenue += Decimal(invoice["total"]) if invoice else 0
        listed.append(
            {
                "tenant": tenant,
                "used": round(seconds, 3),
                "invoice": invoice,
                "in_flight": await state.admission.in_flight(tenant.id),
                "limit": state.settings.tier_limits.get(tenant.tier),
            }
        )
    return render(
        request,
        "admin.html",
        visitor=visitor,
        period=period,
        tenants=listed,
        revenue=f"{revenue:.2f}",
        by_model=[(m, round(s, 3)) for m, s in by_model],
        unsent=unsent,
        lag=round(lag, 1),
        tiers=list(state.settings.tier_limits),
    )


async def _operator_change(state: AppState, request: Request, work) -> str | None:
    """Run an operator action with its audit entry; returns an error message, if any."""
    try:
        async with state.sessions() as session, session.begin():
            await session.run_sync(work)
    except (tenants.NotFound, tenants.InvalidArgument) as exc:
        return str(exc)
    return None


@router.post("/admin/tenants")
async def admin_create_tenant(
    request: Request,
    state: StateDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
    tier: Annotated[str, Form()] = "free",
) -> Response:
    _operator(visitor)
    await _check_csrf(visitor, csrf)

    def work(session: Session) -> None:
        operator.create_tenant(session, _who(request), name, tier, state.settings.tier_limits)

    error = await _operator_change(state, request, work)
    if error:
        return render(request, "error.html", 400, message=error)
    return RedirectResponse("/dashboard/admin", status_code=303)


@router.post("/admin/tenants/{tenant_id}/tier")
async def admin_set_tier(
    tenant_id: str,
    request: Request,
    state: StateDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
    tier: Annotated[str, Form()] = "",
) -> Response:
    _operator(visitor)
    await _check_csrf(visitor, csrf)

    def work(session: Session) -> None:
        operator.set_tier(session, _who(request), tenant_id, tier, state.settings.tier_limits)

    error = await _operator_change(state, request, work)
    if error:
        return render(request, "error.html", 400, message=error)
    return RedirectResponse("/dashboard/admin", status_code=303)


@router.get("/admin/tenants/{tenant_id}")
async def admin_tenant_page(
    tenant_id: str, request: Request, state: StateDep, visitor: VisitorDep, new_key: str = ""
) -> Response:
    _operator(visitor)
    async with state.sessions() as session:
        try:
            tenant = await session.run_sync(lambda s: tenants.get_tenant(s, tenant_id))
        except (tenants.NotFound, tenants.InvalidArgument) as exc:
            return render(request, "error.html", 404, message=str(exc))
    return render(
        request,
        "admin_tenant.html",
        visitor=visitor,
        tenant=tenant,
        keys=await _tenant_keys(state, tenant.id),
        scopes=sorted(tenants.KNOWN_SCOPES),
    )


@router.post("/admin/tenants/{tenant_id}/keys")
async def admin_issue_key(
    tenant_id: str,
    request: Request,
    state: StateDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
    scope: Annotated[list[str] | None, Form()] = None,
) -> Response:
    _operator(visitor)
    await _check_csrf(visitor, csrf)
    made: dict = {}

    def work(session: Session) -> None:
        row, secret = operator.issue_key(session, _who(request), tenant_id, tuple(scope or ()))
        made.update(tenant=row.tenant_id, secret=secret)

    if not scope:
        return render(request, "error.html", 400, message="Choose at least one scope.")
    error = await _operator_change(state, request, work)
    if error:
        return render(request, "error.html", 400, message=error)
    return render(
        request,
        "admin_tenant.html",
        201,
        visitor=visitor,
        tenant=await _get(state, made["tenant"]),
        keys=await _tenant_keys(state, made["tenant"]),
        scopes=sorted(tenants.KNOWN_SCOPES),
        new_key=made["secret"],
    )


@router.post("/admin/keys/{key_id}/revoke")
async def admin_revoke_key(
    key_id: str,
    request: Request,
    state: StateDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    _operator(visitor)
    await _check_csrf(visitor, csrf)
    owner: dict = {}

    def work(session: Session) -> None:
        row = operator.revoke_key(session, _who(request), key_id)
        owner["tenant"] = row.tenant_id

    error = await _operator_change(state, request, work)
    if error:
        return render(request, "error.html", 404, message=error)
    state.key_cache.clear()
    return RedirectResponse(f"/dashboard/admin/tenants/{owner['tenant']}", status_code=303)


async def _get(state: AppState, tenant_id: uuid.UUID) -> Tenant:
    async with state.sessions() as session:
        return await session.get(Tenant, tenant_id)
