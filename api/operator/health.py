"""Liveness and readiness probes."""

import anyio
from fastapi import APIRouter
from fastapi.responses import JSONResponse
from sqlalchemy import text

from api.deps import StateDep

router = APIRouter(tags=["health"])
CHECK_TIMEOUT_SECONDS = 3


@router.get("/healthz")
async def healthz() -> dict:
    return {"status": "ok"}


@router.get("/readyz")
async def readyz(state: StateDep) -> JSONResponse:
    """Ready when PostgreSQL, Redis and the job broker all answer, and the gateway follows
    key revocations (a revoked key is refused as soon as it is announced)."""

    async def postgres() -> None:
        async with state.db.connect() as connection:
            await connection.execute(text("SELECT 1"))

    async def redis() -> None:
        await state.redis.ping()

    async def broker() -> None:
        def connect() -> None:
            with state.celery.connection_for_write() as connection:
                connection.ensure_connection(max_retries=1, timeout=CHECK_TIMEOUT_SECONDS)

        await anyio.to_thread.run_sync(connect)

    checks = {}
    for name, probe in (("postgres", postgres), ("redis", redis), ("broker", broker)):
        try:
            with anyio.fail_after(CHECK_TIMEOUT_SECONDS):
                await probe()
            checks[name] = "ok"
        except Exception as exc:  # a probe reports any failure as "not ready", with its reason
            checks[name] = f"error: {type(exc).__name__}: {exc}"
    following = state.following_revocations.is_set()
    checks["revocations"] = "ok" if following else "error: not following key revocations yet"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, "checks": checks}, status_code=200 if ready else 503)
