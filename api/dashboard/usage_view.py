"""What a tenant's usage looks like on the dashboard: its plan, allowance and estimated invoice
this period, the chart of a range (one model's, when filtered), and a page of its requests. The
tenant's own usage page and the operator's page of a tenant show the same."""

import uuid
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Annotated

from fastapi import Depends, Query
from sqlalchemy.ext.asyncio import AsyncSession

from api.dashboard.chart import draw
from api.dashboard.common import PAGE_SIZE, RANGES, invoice
from api.state import AppState
from billing import usage
from billing.models import Tenant
from billing.plans import Balance, period_of


@dataclass(frozen=True)
class Shown:
    """Which part of a tenant's usage a page shows: the chart's range, one model's (or every
    model's), which page of requests."""

    range_: str = "7d"
    model: str | None = None
    page: int = 1


def shown_of(
    range: Annotated[str, Query(pattern="^(24h|7d|30d)$")] = "7d",  # noqa: A002
    model: Annotated[str | None, Query(max_length=200)] = None,
    page: Annotated[int, Query(ge=1, le=100_000)] = 1,
) -> Shown:
    return Shown(range, model, page)


ShownDep = Annotated[Shown, Depends(shown_of)]


async def usage_view(
    state: AppState, session: AsyncSession, tenant_id: uuid.UUID, shown: Shown
) -> dict:
    range_, model, page = shown.range_, shown.model, shown.page
    now = datetime.now(UTC)
    period = period_of(now)
    span, unit = RANGES[range_]
    tier, used = await usage.admission_view(session, tenant_id, period)
    plan = state.settings.plans[tier]
    balance = Balance(plan, period, used)
    starts = bucket_starts(now - span, now, unit)
    series: dict[str, dict[datetime, float]] = {}
    for start, name, seconds in await usage.model_buckets(session, tenant_id, now - span, unit):
        if not model or name == model:
            series.setdefault(name, {})[datetime.fromisoformat(start)] = seconds
    rows, total, models = await usage.page(
        session, tenant_id, (page - 1) * PAGE_SIZE, PAGE_SIZE, model or None
    )
    included = plan.included_gpu_seconds
    return {
        "tenant": await session.get(Tenant, tenant_id),
        "plan": plan,
        "balance": balance.to_dict(),
        "used_share": min(1.0, used / included) if included else 1.0,
        "invoice": invoice(balance),
        "chart": draw(starts, series, unit),
        "range": range_,
        "ranges": list(RANGES),
        "records": [usage.to_dict(r) for r in rows],
        "total": total,
        "page": page,
        "pages": max(1, -(-total // PAGE_SIZE)),
        "model": model or "",
        "models": models,
    }


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
