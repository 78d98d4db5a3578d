"""The operator's pages: every tenant, their tiers and keys (changes audited)."""

from datetime import UTC, datetime
from decimal import Decimal
from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import RedirectResponse, Response

from api.dashboard.common import (
    VisitorDep,
    check_csrf,
    invoice,
    issue_key,
    operator_only,
    page_change,
    page_change_committed,
    render,
    revoke_key,
    router,
    tenant_keys,
    who_of,
)
from api.dashboard.usage_view import Shown, ShownDep, usage_view
from api.deps import SessionDep, StateDep
from billing import operator, tenants, usage
from billing.plans import Balance, period_of


@router.get("/admin")
async def admin_page(
    request: Request, state: StateDep, session: SessionDep, visitor: VisitorDep
) -> Response:
    operator_only(visitor)
    period = period_of(datetime.now(UTC))
    rows = await tenants.all_tenants(session)
    used = await usage.used_by_tenant(session, period)
    by_model = await usage.used_by_model(session, period)
    unsent, lag = await usage.outbox_backlog(session)
    listed = []
    revenue = Decimal(0)
    in_flight = await state.admission.in_flight_of([tenant.id for tenant in rows])
    for tenant, held in zip(rows, in_flight, strict=True):
        plan = state.settings.plans.get(tenant.tier)
        seconds = float(used.get(tenant.id, 0.0))
        balance = Balance(plan, period, seconds) if plan else None
        bill = invoice(balance) if balance else None
        revenue += balance.total_usd if balance else 0
        listed.append(
            {
                "tenant": tenant,
                "used": round(seconds, 3),
                "invoice": bill,
                "in_flight": held,
                "limit": state.settings.tier_limits.get(tenant.tier),
            }
        )
    return render(
        request,
        "admin.html",
        visitor=visitor,
        period=period,
        tenants=listed,
        revenue=f"{revenue:,.2f}",
        by_model=[(m, round(s, 3)) for m, s in by_model],
        unsent=unsent,
        lag=round(lag, 1),
        # Stripe's events reach the gateway only when its webhook secret is set: without it,
        # usage stays in PostgreSQL and the outbox is no alarm
        stripe_configured=bool(state.settings.stripe_webhook_secret),
        tiers=list(state.settings.tier_limits),
    )


@router.post("/admin/tenants")
async def admin_create_tenant(
    request: Request,
    state: StateDep,
    session: SessionDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
    name: Annotated[str, Form()] = "",
    tier: Annotated[str, Form()] = "free",
) -> Response:
    operator_only(visitor)
    await check_csrf(visitor, csrf)
    tiers = state.settings.tier_limits
    await page_change(
        session, lambda s: operator.create_tenant(s, who_of(request), name, tier, tiers)
    )
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
    operator_only(visitor)
    await check_csrf(visitor, csrf)
    tiers = state.settings.tier_limits
    changed = await page_change_committed(
        state, lambda s: operator.set_tier(s, who_of(request), tenant_id, tier, tiers)
    )
    state.quotas.forget(changed.id)
    return RedirectResponse("/dashboard/admin", status_code=303)


@router.get("/admin/tenants/{tenant_id}")
async def admin_tenant_page(
    tenant_id: str,
    request: Request,
    state: StateDep,
    session: SessionDep,
    visitor: VisitorDep,
    shown: ShownDep,
) -> Response:
    operator_only(visitor)
    tenant = await page_change(session, lambda s: tenants.get_tenant(s, tenant_id), 404)
    return await _tenant_page(request, state, session, visitor, tenant.id, shown)


async def _tenant_page(
    request, state, session, visitor, tenant_id, shown: Shown = Shown(), **extra
) -> Response:
    """A tenant as its operator sees it: its usage (as the tenant's own page shows it), then
    its keys."""
    usage_shown = await usage_view(state, session, tenant_id, shown)
    return render(
        request,
        "admin_tenant.html",
        extra.pop("status", 200),
        visitor=visitor,
        keys=await tenant_keys(session, tenant_id),
        scopes=sorted(tenants.KNOWN_SCOPES),
        here=f"/dashboard/admin/tenants/{tenant_id}",
        **usage_shown,
        **extra,
    )


@router.post("/admin/tenants/{tenant_id}/keys")
async def admin_issue_key(
    tenant_id: str,
    request: Request,
    state: StateDep,
    session: SessionDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
    scope: Annotated[list[str] | None, Form()] = None,
) -> Response:
    operator_only(visitor)
    await check_csrf(visitor, csrf)
    tenant = await page_change(session, lambda s: tenants.get_tenant(s, tenant_id), 404)
    actor = "dashboard (admin token)"
    secret = await issue_key(session, request, actor, tenant.id, tuple(scope or ()))
    return await _tenant_page(
        request, state, session, visitor, tenant.id, status=201, new_key=secret
    )


@router.post("/admin/keys/{key_id}/revoke")
async def admin_revoke_key(
    key_id: str,
    request: Request,
    state: StateDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    operator_only(visitor)
    await check_csrf(visitor, csrf)
    row = await revoke_key(state, request, "dashboard (admin token)", key_id)
    return RedirectResponse(f"/dashboard/admin/tenants/{row.tenant_id}", status_code=303)
