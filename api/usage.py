"""A tenant's own usage records (the `usage:read` scope). The ledger is `billing.usage`."""

from typing import Annotated

from fastapi import APIRouter, Query

from api.deps import StateDep, require
from billing import usage
from billing.tenants import KeyOwner

router = APIRouter(tags=["usage"])
UsageKey = Annotated[KeyOwner, require("usage:read")]


@router.get("/api/usage/requests")
async def requests(
    owner: UsageKey, state: StateDep, limit: Annotated[int, Query(ge=1, le=1000)] = 50
) -> dict:
    """This tenant's most recent requests with what each cost, newest first."""
    async with state.sessions() as session:
        rows = await usage.recent(session, owner.tenant_id, limit)
    records = [usage.to_dict(row) for row in rows]
    return {
        "requests": records,
        "gpu_seconds": round(sum(r["gpu_seconds"] for r in records), 3),
    }
