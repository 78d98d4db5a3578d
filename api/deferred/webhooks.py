"""The tenant's webhook signing secret, and the deliveries of a job's webhook."""

from fastapi import APIRouter

from api.deps import InferenceKey, SessionDep, StateDep
from api.pipeline import store
from webhooks import service

router = APIRouter(tags=["webhooks"])


@router.get("/v1/webhooks/secret")
async def secret(owner: InferenceKey, session: SessionDep) -> dict:
    """The key job webhooks are signed with (Standard Webhooks: verify `webhook-signature`,
    an HMAC-SHA256 over `webhook-id.webhook-timestamp.body`, with it)."""
    return {"key": await service.secret_of(session, owner.tenant_id)}


@router.post("/v1/webhooks/secret/rotate")
async def rotate(owner: InferenceKey, session: SessionDep) -> dict:
    """A new key; deliveries from now on are signed with it."""
    return {"key": await service.rotate_secret(session, owner.tenant_id)}


@router.get("/v1/jobs/{job_id}/webhooks")
async def deliveries(
    job_id: str, owner: InferenceKey, state: StateDep, session: SessionDep
) -> dict:
    """Each event sent for the job: its status, attempts and the receiver's last answer."""
    rows = await service.of_job(session, owner.tenant_id, store.known_id("job", job_id))
    if not rows:
        await store.job_record(state.redis, job_id, str(owner.tenant_id))  # 404 unless theirs
    return {
        "data": [
            {
                "id": str(row.id),
                "event": row.event,
                "url": row.url,
                "status": row.status,
                "attempts": row.attempts,
                "last_status_code": row.last_status_code,
                "last_error": row.last_error,
                "created_at": row.created_at.isoformat(),
                "delivered_at": row.delivered_at.isoformat() if row.delivered_at else None,
            }
            for row in rows
        ]
    }
