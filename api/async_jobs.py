"""Asynchronous jobs (`/v1/jobs`): a chat or image request that runs without holding a
connection, polled (or waited on with `Prefer: wait=N`) and cancellable.

A job is accepted whatever the tenant has in flight: over its tier's limit it waits in the
tenant's queue instead of being refused. Every gateway runs a scheduler that takes, in turn,
one waiting job per tenant (round robin: fair across tenants), takes a slot for it and
enqueues it (api/job_scheduler.py); a tenant at its limit is skipped until a slot frees. A
submitted job's slot lease is renewed by the schedulers until its worker starts it, by the
worker while it runs (which gives it back at the end). A job may name a webhook for its start
and end (webhooks/). Outputs are read from the job's stream, kept for
GPUHOST_STREAM_RETENTION_SECONDS; job records as long. Tenant-scoped: another tenant's id is
a 404.
"""

import asyncio
import hashlib
import logging
import time
from typing import Annotated, Literal

import anyio
from fastapi import APIRouter, Depends, Header, Query
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from redis.exceptions import RedisError

from api.body import json_body, openapi_body, validated
from api.deps import InferenceKey, StateDep
from api.dispatch import check_quota
from api.errors import BadRequest, Conflict, NotFound, Unavailable
from api.ollama.schemas import ImageLimits as ChatImageLimits
from api.ollama.schemas import new_request_id
from api.openai.schemas import ChatCompletionRequest
from api.sd.schemas import ImagesRequest
from api.sd.serving import ImageServing
from api.state import AppState
from webhooks.targets import TargetRefused, networks, resolve
from workers.contract import (
    DoneChunk,
    ErrorChunk,
    ImagesChunk,
    ProgressChunk,
    TokenChunk,
    cancel_key,
    decode_chunk,
    started_key,
    stream_key,
)

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/jobs", tags=["jobs"])

TENANTS_WAITING = "gpuhost:jobs:waiting-tenants"
SUBMITTED = "gpuhost:jobs:submitted"  # enqueued, lease kept by the schedulers until started
# A job's state moves on only from the state the mover expects (waiting -> submitted by a
# scheduler, waiting -> canceled by a cancel): whichever comes first wins, the other sees so.
MOVE = """
if redis.call('HGET', KEYS[1], 'state') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', ARGV[2])
  return 1
end
return 0
"""
HOOKED = "gpuhost:jobs:hooked"  # jobs with a webhook whose last event is not recorded yet

FINISHED = ("succeeded", "failed", "canceled")
MAX_WAIT = 60


def record_key(job_id: str) -> str:
    return f"gpuhost:jobs:{job_id}"


def waiting_key(tenant_id: str) -> str:
    return f"gpuhost:jobs:waiting:{tenant_id}"


def index_key(tenant_id: str) -> str:
    return f"gpuhost:jobs:by-tenant:{tenant_id}"


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
    # and/or completes (succeeded, failed or canceled).
    webhook: WebhookSpec | None = None


async def job_spec(state: AppState, body: JobCreate, owner, job_id: str) -> tuple[object, str]:
    """Validate the input as its API would, and make the job the worker runs."""
    settings = state.settings
    if body.type == "chat":
        chat = validated(ChatCompletionRequest, body.input, ("input",))
        if not state.serves(chat.model):
            raise NotFound(f"The model '{chat.model}' does not exist", param="model")
        limits = ChatImageLimits(
            max_count=settings.max_images_per_request, max_pixels=settings.max_image_pixels
        )
        return chat.to_job(owner, job_id, limits, {}), chat.model
    images = validated(ImagesRequest, body.input, ("input",))
    spec = await ImageServing(state).job(images, owner, job_id)
    return spec, spec.model


def _prefer_wait(prefer: str | None) -> float:
    for part in (prefer or "").split(","):
        name, _, value = part.strip().partition("=")
        if name.strip().lower() == "wait" and value.strip().isdigit():
            return min(float(value), MAX_WAIT)
    return 0.0


def _ended(view: dict, chunk, entry_id: bytes) -> dict:
    """When the job ended (its final chunk's stream time) and started (its queue time after
    submission, as the worker measured it)."""
    finished = int(entry_id.split(b"-")[0]) / 1000
    started = None
    if view["submitted_at"] is not None and not isinstance(chunk, ErrorChunk):
        started = view["submitted_at"] + chunk.queue_seconds
    return {"finished_at": finished, "started_at": started}


async def job_view(state: AppState, job_id: str, tenant_id: str) -> dict:
    raw = await state.redis.hgetall(record_key(job_id))
    record = {k.decode(): v.decode() for k, v in raw.items()}
    if not record or record.get("tenant_id") != tenant_id:
        raise NotFound(f"job {job_id} not found")
    view = {
        "id": job_id,
        "type": record["type"],
        "model": record["model"],
        "created_at": float(record["created_at"]),
        # enqueued to a worker (a slot taken), started on it, ended: unix seconds or null
        "submitted_at": float(record["submitted_at"]) if "submitted_at" in record else None,
        "started_at": None,
        "finished_at": None,
        "status": "queued",
        "progress": None,
        "output": None,
        "error": None,
        "gpu_seconds": None,
        "queue_seconds": None,
    }
    if record["state"] == "canceled":
        return view | {"status": "canceled"}
    if record["state"] != "submitted":
        return view
    entries = await state.redis.xrange(stream_key(job_id))
    text, progress = [], None
    for entry_id, fields in entries:
        chunk = decode_chunk(fields)
        if isinstance(chunk, DoneChunk | ImagesChunk | ErrorChunk):
            view |= _ended(view, chunk, entry_id)
        if isinstance(chunk, TokenChunk):
            text.append(chunk.text)
        elif isinstance(chunk, ProgressChunk):
            progress = {"step": chunk.step, "steps": chunk.steps}
        elif isinstance(chunk, DoneChunk):
            status = "canceled" if chunk.done_reason == "cancelled" else "succeeded"
            usage = {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.output_tokens}
            return view | {
                "status": status,
                "output": {"text": "".join(text), "finish_reason": chunk.done_reason, **usage},
                "gpu_seconds": chunk.gpu_seconds,
                "queue_seconds": chunk.queue_seconds,
            }
        elif isinstance(chunk, ImagesChunk):
            return view | {
                "status": "succeeded",
                "output": {"images": chunk.images, "seed": chunk.seed},
                "gpu_seconds": chunk.gpu_seconds,
                "queue_seconds": chunk.queue_seconds,
            }
        elif isinstance(chunk, ErrorChunk):
            return view | {"status": "failed", "error": chunk.message}
    started = await state.redis.exists(started_key(job_id))
    if text:
        progress = {"tokens": len(text)}
    return view | {"status": "running" if started else "queued", "progress": progress}


async def _settled(state: AppState, job_id: str, tenant_id: str, wait: float) -> dict:
    deadline = time.monotonic() + wait
    while True:
        view = await job_view(state, job_id, tenant_id)
        if view["status"] in FINISHED or time.monotonic() >= deadline:
            return view
        await asyncio.sleep(0.1)


JobBody = Annotated[JobCreate, Depends(json_body(JobCreate))]


@router.post("", status_code=202, openapi_extra=openapi_body(JobCreate))
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
    retention = state.settings.stream_retention_seconds
    if idempotency_key:
        job_id = hashlib.sha256(f"{tenant}:{idempotency_key}".encode()).hexdigest()[:32]
        if not await state.redis.set(
            f"{record_key(job_id)}:key", fingerprint, nx=True, ex=retention
        ):
            if await state.redis.get(f"{record_key(job_id)}:key") != fingerprint.encode():
                raise Conflict("this Idempotency-Key was used with a different request")
            return await _answer(state, job_id, tenant, prefer)
    spec, model = await job_spec(state, body, owner, job_id)
    if body.webhook is not None:
        await _check_webhook(state, body.webhook.url)
    record = {
        "tenant_id": tenant,
        "tier": owner.tier,
        "type": body.type,
        "model": model,
        "created_at": str(time.time()),
        "state": "waiting",
        "spec": spec.model_dump_json(),
    }
    if body.webhook is not None:
        record |= {"webhook_url": body.webhook.url, "webhook_events": ",".join(body.webhook.events)}
    try:
        pipe = state.redis.pipeline(transaction=True)
        pipe.hset(record_key(job_id), mapping=record)
        pipe.expire(record_key(job_id), retention)
        pipe.zadd(index_key(tenant), {job_id: time.time()})
        pipe.expire(index_key(tenant), retention)
        pipe.rpush(waiting_key(tenant), job_id)
        pipe.sadd(TENANTS_WAITING, tenant)
        if body.webhook is not None:
            pipe.sadd(HOOKED, job_id)
        await pipe.execute()
    except RedisError as exc:
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
    view = await _settled(state, job_id, tenant, _prefer_wait(prefer))
    status = 200 if view["status"] in FINISHED else 202
    return JSONResponse(view, status_code=status, headers={"X-Request-Id": job_id})


@router.get("/{job_id}")
async def get(
    job_id: str,
    owner: InferenceKey,
    state: StateDep,
    prefer: Annotated[str | None, Header()] = None,
) -> dict:
    return await _settled(state, job_id, str(owner.tenant_id), _prefer_wait(prefer))


@router.get("")
async def list_jobs(
    owner: InferenceKey, state: StateDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict:
    """The tenant's jobs, newest first."""
    tenant = str(owner.tenant_id)
    ids = await state.redis.zrevrange(index_key(tenant), 0, limit - 1)
    views = []
    for raw in ids:
        try:
            views.append(await job_view(state, raw.decode(), tenant))
        except NotFound:  # its record expired before the index entry
            continue
    return {"jobs": views}


@router.post("/{job_id}/cancel")
async def cancel(job_id: str, owner: InferenceKey, state: StateDep) -> dict:
    """Cancel a job: a waiting one never runs; a running one stops (and is billed for the
    time it ran)."""
    tenant = str(owner.tenant_id)
    await job_view(state, job_id, tenant)  # 404 unless it is this tenant's
    if await state.redis.eval(MOVE, 1, record_key(job_id), "waiting", "canceled"):
        await state.redis.lrem(waiting_key(tenant), 0, job_id)
    else:  # a scheduler took it first: stop it on its worker
        retention = state.settings.stream_retention_seconds
        await state.redis.set(cancel_key(job_id), "1", ex=retention)
    return await _settled(state, job_id, tenant, 2.0)
