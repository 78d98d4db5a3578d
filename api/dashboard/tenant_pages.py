"""A tenant's pages: usage (plan, allowance, estimated invoice, chart, requests) and keys."""

from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from api import revocations
from api.dashboard.common import (
    PAGE_SIZE,
    RANGES,
    NotAllowed,
    VisitorDep,
    check_csrf,
    invoice,
    key_manager_of,
    render,
    router,
    run_committed,
    tenant_keys,
    tenant_of,
    who_of,
)
from api.deps import SessionDep, StateDep
from billing import operator, tenants, usage
from billing.models import Tenant
from billing.plans import Balance, period_of


@router.get("/usage")
async def usage_page(
    request: Request,
    state: StateDep,
    session: SessionDep,
    visitor: VisitorDep,
    range: Annotated[str, Query(pattern="^(24h|7d|30d)$")] = "7d",  # noqa: A002
    model: Annotated[str | None, Query(max_length=200)] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Response:
    tenant_id = tenant_of(visitor)
    now = datetime.now(UTC)
    period = period_of(now)
    span, unit = RANGES[range]
    tier, used = await usage.admission_view(session, tenant_id, period)
    tenant = await session.get(Tenant, tenant_id)
    series = await usage.model_buckets(session, tenant_id, now - span, unit)
    rows, total, models = await usage.page(
        session, tenant_id, (page - 1) * PAGE_SIZE, PAGE_SIZE, model or None
    )
    plan = state.settings.plans[tier]
    balance = Balance(plan, period, used)
    starts = bucket_starts(now - span, now, unit)
    chart = {
        "unit": unit,
        # the x-axis: from the first bucket's start to now, every bucket a point (UTC)
        "from": starts[0].timestamp(),
        "to": now.timestamp(),
        "buckets": [start.isoformat() for start in starts],
        "series": {},
    }
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
        invoice=invoice(balance),
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


@router.get("/keys")
async def keys_page(request: Request, session: SessionDep, visitor: VisitorDep) -> Response:
    tenant_id = tenant_of(visitor)
    return render(
        request,
        "keys.html",
        visitor=visitor,
        keys=await tenant_keys(session, tenant_id),
        scopes=sorted(visitor.scopes),
    )


@router.post("/keys")
async def create_key(
    request: Request,
    session: SessionDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
    scope: Annotated[list[str] | None, Form()] = None,
) -> Response:
    tenant_id = key_manager_of(visitor)
    await check_csrf(visitor, csrf)
    chosen = tuple(scope or ())
    beyond = sorted(set(chosen) - set(visitor.scopes))
    error, secret = None, None
    if not chosen:
        error = "Choose at least one scope."
    elif beyond:
        raise NotAllowed(
            f"a key made here has at most this session's scopes; not {', '.join(beyond)}"
        )
    else:
        try:
            who = who_of(request, "dashboard (tenant)")
            _, secret = await session.run_sync(
                lambda s: operator.issue_key(s, who, tenant_id, chosen)
            )
        except tenants.InvalidArgument as exc:
            error = str(exc)
    return render(
        request,
        "keys.html",
        400 if error else 201,
        visitor=visitor,
        keys=await tenant_keys(session, tenant_id),
        scopes=sorted(visitor.scopes),
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
    tenant_id = key_manager_of(visitor)
    await check_csrf(visitor, csrf)
    # Its own transaction: the key is dropped from the cache once the revocation is committed;
    # another tenant's key is not found.
    who = who_of(request, "dashboard (tenant)")
    row = await run_committed(
        state, lambda s: operator.revoke_key(s, who, key_id, tenant_id=tenant_id), 404
    )
    await revocations.announce(state, row.id)
    return RedirectResponse("/dashboard/keys", status_code=303)


def bucket_starts(since: datetime, until: datetime, unit: str) -> list[datetime]:
    """The start of every hour or day from the one holding `since` to the one holding `until`
    (UTC, as billing.usage buckets them), so that the chart shows the empty ones too."""
    step = timedelta(hours=1) if unit == "hour" else timedelta(days=1)
    start = since.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
    if unit == "day":
        start = start.replace(hour=0)
    starts = []
    while start <= until:
        starts.append(start)
        start += step
    return starts
