"""Asynchronous jobs (`/v1/jobs`): a chat or image request that runs without holding a
connection, polled (or waited on with `Prefer: wait=N`) and cancellable.

A job is accepted whatever the tenant has in flight: over its tier's limit it waits in the
tenant's queue instead of being refused. Every gateway runs a scheduler that takes, in turn,
one waiting job per tenant (round robin: fair across tenants), takes a slot for it and
enqueues it (api/pipeline/scheduler.py); a tenant at its limit is skipped until a slot frees. A
submitted job's slot lease is renewed by the schedulers until its worker starts it, by the
worker while it runs (which gives it back at the end). A job may name a webhook for its start
and end (webhooks/). Outputs are read from the job's stream, kept for
GPUHOST_STREAM_RETENTION_SECONDS; job records as long. Tenant-scoped: another tenant's id is
a 404.
"""

import hashlib
import json
import logging
import time
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from api.deps import InferenceKey, StateDep
from api.errors import (
    OPENAI_ERRORS,
    REDIS_AWAY,
    BadRequest,
    NotFound,
    OpenAIRoute,
    TooManyRequests,
    Unavailable,
)
from api.inputs.json_body import json_body, openapi_body, validated
from api.inputs.wire import ChatImageLimits, list_page, new_request_id
from api.openai.objects import Job, Page
from api.openai.schemas import ChatCompletionRequest
from api.pipeline import store
from api.pipeline.queue_wait import room_in_line
from api.pipeline.submit import check_quota
from api.pipeline.view import FINISHED, job_view, settled_view
from api.sd.schemas import ImagesRequest
from api.sd.serving import ImageServing
from api.state import AppState
from config import traces
from webhooks.targets import TargetRefused, networks, resolve
from workers.keyspace import cancel_key

log = logging.getLogger(__name__)
router = APIRouter(
    prefix="/v1/jobs", tags=["jobs"], route_class=OpenAIRoute, responses=OPENAI_ERRORS
)

MAX_WAIT = 60


class WebhookSpec(BaseModel):
    model_config = ConfigDict(extra="forbid")

    url: str = Field(max_length=2000, description="http(s) URL, on a public address")
    events: list[Literal["start", "completed"]] = Field(
        default_factory=lambda: ["completed"], min_length=1, max_length=2
    )


class JobCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")

    type: Literal["chat", "images"]
    # chat: an OpenAI chat completion request (`stream` is ignored); images: /api/images's body
    input: dict = Field(description="the request, as /v1/chat/completions or /api/images take it")
    # Called (signed with the tenant's secret, GET /v1/webhooks/secret) when the job starts
    # and/or completes (succeeded, failed or cancelled).
    webhook: WebhookSpec | None = None


async def job_spec(state: AppState, body: JobCreate, owner, job_id: str) -> tuple[object, str]:
    """Validate the input as its API would, and make the job the worker runs."""
    settings = state.settings
    if body.type == "chat":
        chat = validated(ChatCompletionRequest, body.input, ("input",))
        if chat.n > 1:
            raise BadRequest("field 'input.n': a job gives one answer", param="input.n")
        if not state.serves(chat.model):
            raise NotFound(f"The model '{chat.model}' does not exist", param="model")
        limits = ChatImageLimits.of(settings)
        spec = await state.decoder.run(
            owner, chat.carries_images(), chat.to_job, owner, job_id, limits, {}
        )
        return spec, chat.model
    images = validated(ImagesRequest, body.input, ("input",))
    spec = await ImageServing(state).job(images, owner, job_id)
    return spec, spec.model


def _prefer_wait(prefer: str | None) -> float:
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait" and value.strip().isdigit():
            return min(float(value), MAX_WAIT)
    return 0.0


JobBody = Annotated[JobCreate, Depends(json_body(JobCreate))]


@router.post("", status_code=202, openapi_extra=openapi_body(JobCreate), response_model=Job)
async def create(
    owner: InferenceKey,
    state: StateDep,
    body: JobBody,
    prefer: Annotated[str | None, Header()] = None,
    idempotency_key: Annotated[str | None, Header(max_length=255)] = None,
) -> JSONResponse:
    """Accept a job: it waits its turn when the tenant is at its limit, then runs. The same
    `Idempotency-Key` again (within the retention time) answers with the job it made, never a
    second one, so a client may retry after any network failure."""
    await check_quota(state, owner)  # 402 when the allowance is spent, as for any request
    tenant = str(owner.tenant_id)
    fingerprint = hashlib.sha256(body.model_dump_json().encode()).hexdigest()
    job_id = new_request_id()
    if idempotency_key:
        job_id = hashlib.sha256(f"{tenant}:{idempotency_key}".encode()).hexdigest()[:32]
    retention = state.settings.stream_retention_seconds
    # The request is checked before its Idempotency-Key is claimed: a refused request (400,
    # 404) claims nothing, so the corrected request may use the same key.
    spec, model = await job_spec(state, body, owner, job_id)
    spec.trace = traces.carrier()  # its worker's span continues this request's trace
    if body.webhook is not None:
        await _check_webhook(state, body.webhook.url)
    if idempotency_key and not await store.claim_idempotency(
        state.redis, job_id, fingerprint, retention
    ):
        return await _answer(state, job_id, tenant, prefer)
    try:
        await room_in_line(state, tenant, owner.tier)
    except TooManyRequests:
        if idempotency_key:
            await store.release_idempotency(state.redis, job_id)
        raise
    now = time.time()
    record = {
        "tenant_id": tenant,
        "tier": owner.tier,
        "type": body.type,
        "model": model,
        "created_at": str(now),
        "spec": spec.model_dump_json(),
    }
    if getattr(spec, "tools", None):  # its answer may be a call (api/pipeline/view.py)
        record["tools"] = json.dumps([tool.model_dump() for tool in spec.tools])
    if body.webhook is not None:
        record |= {"webhook_url": body.webhook.url, "webhook_events": ",".join(body.webhook.events)}
    try:
        hooked = body.webhook is not None
        await store.add_waiting_job(state.redis, job_id, record, retention, hooked, now)
    except RedisError as exc:
        if idempotency_key:
            await store.release_idempotency(state.redis, job_id)
        if not isinstance(exc, REDIS_AWAY):
            raise
        raise Unavailable(f"the job store is unavailable ({exc}); try again shortly") from exc
    return await _answer(state, job_id, tenant, prefer)


async def _check_webhook(state: AppState, url: str) -> None:
    allowed = networks(state.settings.webhook_allowed_networks)
    try:
        await anyio.to_thread.run_sync(resolve, url, allowed)
    except TargetRefused as exc:
        raise BadRequest(f"field 'webhook.url': {exc}", param="webhook.url") from None


async def _answer(state: AppState, job_id: str, tenant: str, prefer: str | None) -> JSONResponse:
    """The job as it stands once settled or after `Prefer: wait`: 200 if over, else 202."""
    view = await settled_view(state, job_id, tenant, _prefer_wait(prefer))
    status = 200 if view["status"] in FINISHED else 202
    return JSONResponse(view, status_code=status, headers={"X-Request-Id": job_id})


@router.get("/{job_id}", response_model=Job)
async def get(
    job_id: str,
    owner: InferenceKey,
    state: StateDep,
    prefer: Annotated[str | None, Header()] = None,
) -> dict:
    return await settled_view(state, job_id, str(owner.tenant_id), _prefer_wait(prefer))


@router.get("", response_model=Page[Job])
async def list_jobs(
    owner: InferenceKey,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict:
    """The tenant's jobs, newest first, `limit` at a time; the next page starts `after` the
    last id of this one."""
    tenant = str(owner.tenant_id)
    ids, more = await store.tenant_job_ids(state.redis, tenant, limit, after)
    views = await store.views_of(ids, lambda job_id: job_view(state, job_id, tenant))
    return list_page(views, more)


@router.post("/{job_id}/cancel", response_model=Job)
async def cancel(job_id: str, owner: InferenceKey, state: StateDep) -> dict:
    """Cancel a job: a waiting one never runs; a running one stops (and is billed for the
    time it ran)."""
    tenant = str(owner.tenant_id)
    await job_view(state, job_id, tenant)  # 404 unless it is this tenant's
    if await store.move_job(state.redis, job_id, store.WAITING, store.CANCELLED):
        await store.unqueue(state.redis, tenant, job_id)
    else:  # a scheduler took it first: stop it on its worker
        retention = state.settings.stream_retention_seconds
        await state.redis.set(cancel_key(job_id), "1", ex=retention)
    return await settled_view(state, job_id, tenant, 2.0)
