"""The billing dashboard, server-rendered under /dashboard.

Tenants sign in with an API key that has the `usage:read` scope and see their plan, allowance,
GPU-seconds by model over time, their requests, the period's estimated invoice, and their
keys. Operators sign in with the admin token and see every tenant, change tiers, issue and
revoke keys (each action in the audit log, as through /admin).

Sessions live in Redis (`gpuhost:dashboard:session:<random>`), named by an HttpOnly, SameSite=Strict
cookie (Secure when served over HTTPS); every form carries the session's CSRF token. A tenant
session ends as soon as the key it was opened with is revoked or expires.
"""

import hmac
import json
import secrets
from typing import Annotated

from fastapi import Form, Request
from fastapi.responses import RedirectResponse, Response

from api.dashboard.common import (
    COOKIE,
    SESSION_SECONDS,
    STATIC,
    PageError,
    SignInRequired,
    VisitorDep,
    check_csrf,
    render,
    router,
    secure,
)
from api.deps import SessionDep, StateDep
from billing import tenants
from billing.keys import PREFIX, well_formed
from workers.keyspace import dashboard_session_key


def install(app) -> None:
    """Routes, static files, and the handlers that turn errors into pages."""
    from fastapi.staticfiles import StaticFiles

    from api.dashboard import operator_pages, tenant_pages  # noqa: F401 (their routes)

    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")

    @app.exception_handler(SignInRequired)
    async def sign_in(request: Request, exc: SignInRequired) -> Response:
        response = RedirectResponse("/dashboard/login", status_code=303)
        response.delete_cookie(COOKIE, path="/dashboard")
        return response

    @app.exception_handler(PageError)
    async def page_error(request: Request, exc: PageError) -> Response:
        return render(request, "error.html", exc.status, message=exc.message)


# -- signing in and out ------------------------------------------------------------------------


@router.get("")
async def home(visitor: VisitorDep) -> Response:
    target = "/dashboard/usage" if visitor.kind == "tenant" else "/dashboard/admin"
    return RedirectResponse(target, status_code=303)


@router.get("/login")
async def login_page(request: Request) -> Response:
    return render(request, "login.html")


@router.post("/login")
async def login(
    request: Request, state: StateDep, db: SessionDep, credential: Annotated[str, Form()] = ""
) -> Response:
    credential = credential.strip()
    session = {"csrf": secrets.token_urlsafe(24)}
    admin_token = state.settings.admin_token
    if admin_token and hmac.compare_digest(credential.encode(), admin_token.encode()):
        session["kind"] = "operator"
    elif credential.startswith(PREFIX):
        owner = None
        if well_formed(credential):
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
    await state.redis.set(dashboard_session_key(token), json.dumps(session), ex=SESSION_SECONDS)
    target = "/dashboard/usage" if session["kind"] == "tenant" else "/dashboard/admin"
    response = RedirectResponse(target, status_code=303)
    response.set_cookie(
        COOKIE,
        token,
        max_age=SESSION_SECONDS,
        path="/dashboard",
        httponly=True,
        samesite="strict",
        secure=secure(request),
    )
    return response


@router.post("/logout")
async def logout(
    request: Request, state: StateDep, visitor: VisitorDep, csrf: Annotated[str, Form()] = ""
) -> Response:
    await check_csrf(visitor, csrf)
    await state.redis.delete(dashboard_session_key(visitor.token))
    response = RedirectResponse("/dashboard/login", status_code=303)
    response.delete_cookie(COOKIE, path="/dashboard")
    return response
