"""FastAPI dependencies, as Annotated aliases."""

import hmac
from collections.abc import AsyncIterator
from datetime import UTC, datetime
from typing import Annotated

from fastapi import Depends, Request
from sqlalchemy.ext.asyncio import AsyncSession

from api.errors import Forbidden, Unauthorized, Unavailable
from api.settings import GatewaySettings
from api.state import AppState
from billing.db import async_transaction, database_away
from billing.keys import hash_key
from billing.tenants import KeyOwner, owner_of_key
from config import logs

# Where api/guards/limits.py hands on the owner of a key it checked, in the request's state.
KEY_OWNER = "key_owner"


async def get_state(request: Request) -> AppState:
    return request.state.gpuhost


StateDep = Annotated[AppState, Depends(get_state)]


async def db_session(state: StateDep) -> AsyncIterator[AsyncSession]:
    """The request's database session: one transaction, committed when the route returns and
    before its response is sent (scope "function"), rolled back if it raises. It takes a
    connection only at its first statement. A route whose work must follow the commit
    (deleting a file, enqueueing a task) opens its own transaction instead and says so."""
    async with async_transaction(state.sessions) as session:
        yield session


SessionDep = Annotated[AsyncSession, Depends(db_session, scope="function")]


async def authenticate(request: Request, state: StateDep) -> KeyOwner:
    # a request with a body was authenticated before it was read (api/guards/limits.py)
    owner = request.scope["state"].get(KEY_OWNER)
    if owner is None or owner.expired(datetime.now(UTC)):
        header = request.headers.get("authorization", "")
        owner = await owner_of_key_header(state, header, client_address(request.scope))
    logs.bind(tenant_id=owner.tenant_id)  # on every line of this request from now on
    return owner


def bearer(header: str) -> str:
    """The credential of an `Authorization: Bearer <credential>` header; "" for any other."""
    scheme, _, presented = header.partition(" ")
    return presented.strip() if scheme.lower() == "bearer" else ""


def is_admin_token(settings: GatewaySettings, presented: str) -> bool:
    """`presented` is the operator's token (never true while the admin API is off)."""
    token = settings.admin_token
    return bool(token) and hmac.compare_digest(presented.encode(), token.encode())


def client_address(scope) -> str:
    """The client's address (behind trusted proxies, the one they name: `gpuhost serve`)."""
    return (scope.get("client") or ("unknown", 0))[0]


async def owner_of_key_header(state: AppState, header: str, address: str) -> KeyOwner:
    """The owner of the API key in an Authorization header, or the 401 (429 when its sender
    has failed too often, 503 while the key store is away) that says why. A valid key is
    never refused for others' failures (api/guards/throttle.py)."""
    if not header:
        raise Unauthorized("missing API key: send 'Authorization: Bearer <key>'")
    presented = bearer(header)
    if not presented:
        raise Unauthorized("malformed Authorization header: expected 'Bearer <key>'")
    cache_key = hash_key(presented)
    owner = state.key_cache.get(cache_key)
    if owner is None:
        try:
            owner = await _look_up(state, presented, cache_key)
        except Unauthorized as refused:
            raise await state.throttle.failed(address) or refused from None
    if owner.expired(datetime.now(UTC)):
        state.key_cache.pop(cache_key, None)
        state.known_keys.pop(cache_key, None)
        raise Unauthorized("invalid API key: unknown, revoked or expired")
    return owner


async def _look_up(state: AppState, presented: str, cache_key: str) -> KeyOwner:
    """The key's owner from the ledger, cached; while the ledger is away, as it was looked up
    within the outage grace (not cached again: the grace runs from the last real read)."""
    generation = state.key_generation
    try:
        async with async_transaction(state.sessions) as session:
            owner = await owner_of_key(session, presented)
    except Exception as exc:
        if not database_away(exc):
            raise
        known = state.known_keys.get(cache_key)
        if known is None:
            raise Unavailable("the key store is unavailable; try again shortly") from exc
        return known
    if owner is None:
        raise Unauthorized("invalid API key: unknown, revoked or expired")
    if generation == state.key_generation:  # no revocation came while it was read
        state.key_cache[cache_key] = owner
        state.known_keys[cache_key] = owner
    return owner


TenantKey = Annotated[KeyOwner, Depends(authenticate)]


def require(scope: str):
    async def check(owner: TenantKey) -> KeyOwner:
        if scope not in owner.scopes:
            raise Forbidden(f"this API key lacks the '{scope}' scope")
        return owner

    return Depends(check)


InferenceKey = Annotated[KeyOwner, require("inference")]
