"""Billing's synchronous admin functions (tenants, tiers, keys, each change with its audit
entry), run from the gateway's async routes: the admin API's and the dashboard's alike. A
refusal (an unknown id, an invalid argument) becomes the caller's own error."""

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.ext.asyncio import AsyncSession

from api.errors import ApiError, BadRequest, NotFound
from api.state import AppState
from billing import tenants
from billing.db import async_transaction

T = TypeVar("T")
Refusal = Callable[[int, str], Exception]  # (HTTP status, message) -> the error to raise


def api_refusal(status: int, message: str) -> ApiError:
    return NotFound(message) if status == 404 else BadRequest(message)


async def run_change(
    session: AsyncSession, work: Callable[..., T], refused: Refusal = api_refusal
) -> T:
    """`work(session)` in `session`'s transaction (the route's)."""
    try:
        return await session.run_sync(work)
    except tenants.Unknown as exc:
        raise refused(404, str(exc)) from None
    except tenants.InvalidArgument as exc:
        raise refused(400, str(exc)) from None


async def run_committed(
    state: AppState, work: Callable[..., T], refused: Refusal = api_refusal
) -> T:
    """`run_change` in a transaction of its own, committed when this returns: for a change
    whose caches must be dropped only once it is committed (else a request in between caches
    the old state again)."""
    async with async_transaction(state.sessions) as session:
        return await run_change(session, work, refused)
