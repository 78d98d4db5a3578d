"""The tenant's webhook signing secret, and the deliveries of a job's webhook."""

from fastapi import APIRouter

from api.deps import InferenceKey, SessionDep, StateDep
from api.errors import OPENAI_ERRORS, OpenAIRoute
from api.inputs.wire import list_page
from api.openai.objects import Page, WebhookDelivery, WebhookSecret
from api.pipeline import store
from webhooks import service

router = APIRouter(tags=["webhooks"], route_class=OpenAIRoute, responses=OPENAI_ERRORS)


@router.get("/v1/webhooks/secret", response_model=WebhookSecret)
async def secret(owner: InferenceKey, session: SessionDep) -> dict:
    """The key job webhooks are signed with (Standard Webhooks: verify `webhook-signature`,
    an HMAC-SHA256 over `webhook-id.webhook-timestamp.body`, with it)."""
    return {"key": await service.secret_of(session, owner.tenant_id)}


@router.post("/v1/webhooks/secret/rotate", response_model=WebhookSecret)
async def rotate(owner: InferenceKey, session: SessionDep) -> dict:
    """A new key; deliveries from now on are signed with it."""
    return {"key": await service.rotate_secret(session, owner.tenant_id)}


@router.get("/v1/jobs/{job_id}/webhooks", response_model=Page[WebhookDelivery])
async def deliveries(
    job_id: str, owner: InferenceKey, state: StateDep, session: SessionDep
) -> dict:
    """Each event sent for the job: its status, attempts and the receiver's last answer."""
    rows = await service.of_job(session, owner.tenant_id, store.known_id("job", job_id))
    if not rows:
        await store.job_record(state.redis, job_id, str(owner.tenant_id))  # 404 unless theirs
    return list_page(
        [
            {
                "id": str(row.id),
                "event": row.event,
                "url": row.url,
                "status": row.status,
                "attempts": row.attempts,
                "last_status_code": row.last_status_code,
                "last_error": row.last_error,
                "created_at": int(row.created_at.timestamp()),
                "delivered_at": int(row.delivered_at.timestamp()) if row.delivered_at else None,
            }
            for row in rows
        ]
    )
