"""A tenant's pages: usage (plan, allowance, estimated invoice, chart, requests) and keys."""

from typing import Annotated

from fastapi import Form, Query, Request
from fastapi.responses import RedirectResponse, Response

from api.dashboard.common import (
    NotAllowed,
    PageError,
    VisitorDep,
    check_csrf,
    issue_key,
    key_manager_of,
    render,
    revoke_key,
    router,
    tenant_keys,
    tenant_of,
)
from api.dashboard.usage_view import usage_view
from api.deps import SessionDep, StateDep


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
    shown = await usage_view(state, session, tenant_id, range, model, page)
    return render(request, "usage.html", visitor=visitor, **shown)


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
async def create_own_key(
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
    if beyond:
        raise NotAllowed(
            f"a key made here has at most this session's scopes; not {', '.join(beyond)}"
        )
    error, secret = None, None
    try:
        secret = await issue_key(session, request, "dashboard (tenant)", tenant_id, chosen)
    except PageError as exc:
        error = exc.message
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
async def revoke_own_key(
    key_id: str,
    request: Request,
    state: StateDep,
    visitor: VisitorDep,
    csrf: Annotated[str, Form()] = "",
) -> Response:
    tenant_id = key_manager_of(visitor)
    await check_csrf(visitor, csrf)
    await revoke_key(state, request, "dashboard (tenant)", key_id, tenant_id)
    return RedirectResponse("/dashboard/keys", status_code=303)
