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
from fastapi.responses import FileResponse, RedirectResponse, Response

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
from api.deps import SessionDep, StateDep, client_address, is_admin_token
from billing import tenants
from billing.keys import PREFIX, well_formed
from workers.keyspace import dashboard_session_key


def install(app) -> None:
    """Routes, static files, and the handlers that turn errors into pages."""
    from fastapi.staticfiles import StaticFiles

    from api.dashboard import operator_pages, tenant_pages  # noqa: F401 (their routes)

    app.include_router(router)
    app.mount("/dashboard/static", StaticFiles(directory=STATIC), name="dashboard-static")

    @app.get("/", include_in_schema=False)
    async def root() -> Response:
        """A browser's first request: the dashboard (which asks for a sign-in)."""
        return RedirectResponse("/dashboard", status_code=307)

    @app.get("/favicon.ico", include_in_schema=False)
    async def favicon() -> Response:
        return FileResponse(STATIC / "favicon.svg", media_type="image/svg+xml")

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


# The sign-in form's CSRF token: a cookie of its own, matched by the form's hidden field, so
# that another site cannot sign a browser in to an account of its choosing (login CSRF).
SIGN_IN_COOKIE = "gpuhost_sign_in"


def login_form(
    request: Request, status: int = 200, headers: dict | None = None, **context
) -> Response:
    token = secrets.token_urlsafe(24)
    page = render(request, "login.html", status, headers, csrf=token, **context)
    _set_cookie(page, request, SIGN_IN_COOKIE, token, "/dashboard/login")
    return page


def _set_cookie(response: Response, request: Request, name: str, value: str, path: str) -> None:
    """A cookie no script reads, sent back to this site only, over HTTPS when it was used."""
    response.set_cookie(
        name,
        value,
        max_age=SESSION_SECONDS,
        path=path,
        httponly=True,
        samesite="strict",
        secure=secure(request),
    )


@router.get("/login")
async def login_page(request: Request) -> Response:
    return login_form(request)


@router.post("/login")
async def login(
    request: Request,
    state: StateDep,
    db: SessionDep,
    credential: Annotated[str, Form()] = "",
    csrf: Annotated[str, Form()] = "",
) -> Response:
    expected = request.cookies.get(SIGN_IN_COOKIE, "")
    if not expected or not hmac.compare_digest(expected.encode(), csrf.encode()):
        error = "This sign-in form has expired or did not come from this dashboard; try again."
        return login_form(request, 403, error=error)
    credential = credential.strip()
    session = {"csrf": secrets.token_urlsafe(24)}
    if is_admin_token(state.settings, credential):
        session["kind"] = "operator"
    else:
        owner = None
        if well_formed(credential):
            owner = await tenants.owner_of_key(db, credential)
        if owner is None:
            error = (
                "That key is not valid."
                if credential.startswith(PREFIX)
                else "Enter an API key (gph_...) or the admin token."
            )
            refused = await state.throttle.failed(client_address(request.scope))
            if refused is not None:
                return login_form(request, refused.status, refused.headers, error=refused.message)
            return login_form(request, 401, error=error)
        if "usage:read" not in owner.scopes:
            return login_form(request, 403, error="That key lacks the usage:read scope.")
        session |= {
            "kind": "tenant",
            "tenant_id": str(owner.tenant_id),
            "key_id": str(owner.key_id),
        }
    token = secrets.token_urlsafe(32)
    await state.redis.set(dashboard_session_key(token), json.dumps(session), ex=SESSION_SECONDS)
    target = "/dashboard/usage" if session["kind"] == "tenant" else "/dashboard/admin"
    response = RedirectResponse(target, status_code=303)
    _set_cookie(response, request, COOKIE, token, "/dashboard")
    response.delete_cookie(SIGN_IN_COOKIE, path="/dashboard/login")
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
