"""A tenant's own usage (the `usage:read` scope): records, totals by hour or day, balance.

The numbers come from the ledger, `billing.usage`; this module only shapes them.
"""

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Annotated, Literal

from fastapi import APIRouter, Query

from api.deps import SessionDep, StateDep, require
from api.errors import OLLAMA_ERRORS, Forbidden, OllamaRoute
from billing import usage
from billing.plans import Balance, period_of
from billing.tenants import KeyOwner

router = APIRouter(tags=["usage"], route_class=OllamaRoute, responses=OLLAMA_ERRORS)
UsageKey = Annotated[KeyOwner, require("usage:read")]
SUB_CENT = Decimal("0.0001")  # costs are shown to a hundredth of a cent
RANGES = {
    "24h": (timedelta(hours=24), "hour"),
    "7d": (timedelta(days=7), "day"),
    "30d": (timedelta(days=30), "day"),
}


@router.get("/api/usage/requests")
async def requests(
    owner: UsageKey, session: SessionDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> dict:
    """This tenant's most recent requests with what each cost, newest first."""
    rows = await usage.recent(session, owner.tenant_id, limit)
    records = [usage.to_dict(row) for row in rows]
    return {
        "requests": records,
        "gpu_seconds": round(sum(r["gpu_seconds"] for r in records), 3),
    }


@router.get("/api/usage")
async def summary(
    owner: UsageKey,
    state: StateDep,
    session: SessionDep,
    range: Annotated[Literal["24h", "7d", "30d"], Query()] = "24h",  # noqa: A002 (API name)
) -> dict:
    """Totals and hourly (24h) or daily (7d, 30d) buckets: GPU-seconds, requests, tokens,
    images, and what they cost on the tenant's plan beyond its monthly price: a bucket's
    seconds within the period's allowance cost nothing, those beyond it the overage price
    (`Plan.overage_usd`, as the invoice counts them)."""
    span, unit = RANGES[range]
    since = datetime.now(UTC) - span
    rows = await usage.buckets(session, owner.tenant_id, since, unit)
    plan = state.settings.plans.get(owner.tier)
    used: dict[datetime, float] = {}  # by billing period: its seconds before this bucket
    total_cost = Decimal(0)
    for row in rows:
        period = period_of(datetime.fromisoformat(row["start"]))
        if period.start not in used:
            before = since if since > period.start else period.start
            used[period.start] = await usage.used_between(
                session, owner.tenant_id, period.start, before
            )
        cost = plan.overage_usd(used[period.start], row["gpu_seconds"]) if plan else Decimal(0)
        used[period.start] += row["gpu_seconds"]
        total_cost += cost
        row["cost_usd"] = str(cost.quantize(SUB_CENT))
    keys = ("gpu_seconds", "requests", "prompt_tokens", "output_tokens", "images")
    totals = {key: sum(row[key] for row in rows) for key in keys}
    totals["gpu_seconds"] = round(totals["gpu_seconds"], 3)
    totals["cost_usd"] = str(total_cost.quantize(SUB_CENT))
    return {
        "range": range,
        "since": since.isoformat(),
        "unit": unit,
        "totals": totals,
        "buckets": rows,
    }


@router.get("/api/balance")
async def balance(owner: UsageKey, state: StateDep, session: SessionDep) -> dict:
    """This billing period: the plan's allowance, what is used, what remains, when it renews."""
    period = period_of(datetime.now(UTC))
    tier, used = await usage.admission_view(session, owner.tenant_id, period)
    plan = state.settings.plans.get(tier)
    if plan is None:
        raise Forbidden(f"tier '{tier}' has no plan on this server")
    return Balance(plan, period, used).to_dict()
