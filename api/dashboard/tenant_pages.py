"""A tenant's pages: usage (plan, allowance, estimated invoice, chart, requests) and keys."""

from typing import Annotated

from fastapi import Form, Request
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
from api.dashboard.usage_view import ShownDep, usage_view
from api.deps import SessionDep, StateDep


@router.get("/usage")
async def usage_page(
    request: Request,
    state: StateDep,
    session: SessionDep,
    visitor: VisitorDep,
    shown: ShownDep,
) -> Response:
    tenant_id = tenant_of(visitor)
    return render(
        request, "usage.html", visitor=visitor, **await usage_view(state, session, tenant_id, shown)
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
