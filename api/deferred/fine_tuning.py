"""Fine-tuning (`/v1/fine_tuning/jobs`) and the adapters it makes (`/v1/adapters`).

A job is a dataset upload (a zip of images with captions, checked here before anything is
kept) and training settings; it runs on a train worker as LoRA training of the Stable
Diffusion UNet, reporting step and loss, checkpointing, resuming after a lost worker. It ends
with an adapter the tenant owns and uses by id in image requests (`lora`, `lora_weight`).
Each tier has a limit on jobs queued or running at once and on a dataset's size. Everything is
tenant-scoped: another tenant's id is a 404.
"""

import logging
import shutil
import tempfile
from typing import Annotated, BinaryIO

import anyio
from fastapi import APIRouter, File, Form, Query, UploadFile
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError
from sqlalchemy.ext.asyncio import AsyncSession

from api.deferred.files import file_for
from api.deps import InferenceKey, SessionDep, StateDep
from api.errors import (
    OPENAI_ERRORS,
    BadRequest,
    NotFound,
    OpenAIRoute,
    PayloadTooLarge,
    TooManyRequests,
    Unavailable,
)
from api.inputs.wire import list_page
from api.openai import objects
from api.pipeline.submit import check_quota
from api.sd.serving import ImageServing
from billing.db import async_transaction
from billing.tenants import KeyOwner
from storage import tenant_key
from tuning import dataset
from tuning import service as tuning
from tuning.models import QUEUED, Adapter, FineTune, FineTuneSegment
from tuning.params import TrainParams
from workers.contract import send_training

log = logging.getLogger(__name__)
router = APIRouter(tags=["fine-tuning"], route_class=OpenAIRoute, responses=OPENAI_ERRORS)
JOBS = "/v1/fine_tuning/jobs"


def _time(moment) -> int | None:
    return int(moment.timestamp()) if moment else None


def job_view(job: FineTune, segments: list[FineTuneSegment] | None = None) -> dict:
    view = {
        "id": job.id,
        "object": "fine_tuning.job",
        "model": job.model,
        "status": job.status,
        "created_at": _time(job.created_at),
        "started_at": _time(job.started_at),
        "finished_at": _time(job.finished_at),
        "params": job.params,
        "dataset": {"images": job.dataset_images, "bytes": job.dataset_bytes},
        "progress": {"step": job.step, "steps": job.params["steps"], "loss": job.loss},
        "checkpoint_step": job.checkpoint_step,
        "attempts": job.attempts,
        "gpu_seconds": job.gpu_seconds,
        "adapter_id": job.adapter_id,
        "error": job.error,
    }
    if segments is not None:
        view["checkpoints"] = [
            {
                "step": s.to_step,
                "from_step": s.from_step,
                "loss": s.loss,
                "gpu_seconds": s.gpu_seconds,
            }
            for s in segments
        ]
    return view


def adapter_view(adapter: Adapter) -> dict:
    return {
        "id": adapter.id,
        "object": "adapter",
        "model": adapter.model,
        "fine_tune_id": adapter.fine_tune_id,
        "rank": adapter.rank,
        "bytes": adapter.size_bytes,
        "created_at": _time(adapter.created_at),
    }


def _params(fields: dict) -> dict:
    try:
        return TrainParams(**{k: v for k, v in fields.items() if v is not None}).model_dump()
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        name = ".".join(str(part) for part in error["loc"])
        raise BadRequest(f"field '{name}': {error['msg']}", param=name) from None


def _job_limit(plan) -> TooManyRequests:
    return TooManyRequests(
        f"the {plan.name} plan allows {plan.training_jobs} fine-tuning job(s) queued or "
        "running at once; wait for one to finish or cancel one"
    )


@router.post(JOBS, status_code=201, response_model=objects.FineTuningJob)
async def create(
    owner: InferenceKey,
    state: StateDep,
    dataset_file: Annotated[UploadFile | None, File(alias="dataset")] = None,
    training_file: Annotated[str | None, Form()] = None,
    model: Annotated[str | None, Form()] = None,
    steps: Annotated[int | None, Form()] = None,
    rank: Annotated[int | None, Form()] = None,
    learning_rate: Annotated[float | None, Form()] = None,
    batch_size: Annotated[int | None, Form()] = None,
    resolution: Annotated[int | None, Form()] = None,
    seed: Annotated[int | None, Form()] = None,
    checkpoint_every: Annotated[int | None, Form()] = None,
) -> JSONResponse:
    """Upload a dataset (multipart field `dataset`: a zip of images with captions; or name a
    file of purpose fine-tune uploaded to /v1/files, `training_file`) and train a
    LoRA adapter on it. Answers at once with the queued job; poll it for progress."""
    tier = await check_quota(state, owner)
    plan = state.settings.plans[tier]
    model_name = ImageServing(state).model(model)
    params = _params(
        {
            "steps": steps,
            "rank": rank,
            "learning_rate": learning_rate,
            "batch_size": batch_size,
            "resolution": resolution,
            "seed": seed,
            "checkpoint_every": checkpoint_every,
        }
    )
    if params["resolution"] is not None and params["resolution"] > state.settings.sd_max_side:
        raise BadRequest(
            f"field 'resolution': {params['resolution']} is over the limit of "
            f"{state.settings.sd_max_side} pixels",
            param="resolution",
        )
    if (dataset_file is None) == (training_file is None):
        raise BadRequest(
            "give the dataset as an upload ('dataset') or as a file of purpose fine-tune "
            "('training_file'), one of the two",
            param="dataset",
        )
    # Read from a spooled file (on disk past 1 MiB), never whole into memory: the upload's, or
    # a copy of the stored file's bytes.
    with tempfile.SpooledTemporaryFile(max_size=1024 * 1024) as copy:
        if dataset_file is not None:
            source = dataset_file.file
        else:
            source = await _stored_dataset(state, owner, training_file, plan, copy)
        return await _train(state, owner, plan, model_name, params, source)


async def _stored_dataset(state, owner: KeyOwner, file_id: str, plan, copy: BinaryIO) -> BinaryIO:
    """The tenant's file `file_id` (purpose fine-tune), copied into `copy`."""
    stored = await file_for(state, owner, file_id, "fine-tune", "training_file")
    if stored.bytes > plan.dataset_bytes:
        raise PayloadTooLarge(
            f"training_file: {stored.bytes} bytes; the {plan.name} plan allows "
            f"{plan.dataset_bytes}",
            param="training_file",
        )

    def read() -> None:
        with state.storage.open(stored.storage_key) as kept:
            shutil.copyfileobj(kept, copy, 1024 * 1024)

    await anyio.to_thread.run_sync(read)
    return copy


async def _train(state, owner: KeyOwner, plan, model_name: str, params: dict, source: BinaryIO):
    """Check the dataset, keep it, and queue the job (201 with it)."""
    size = await anyio.to_thread.run_sync(source.seek, 0, 2)
    if size > plan.dataset_bytes:
        raise PayloadTooLarge(
            f"dataset: {size} bytes; the {plan.name} plan allows {plan.dataset_bytes}",
            param="dataset",
        )
    limits = dataset.DatasetLimits(
        max_images=state.settings.dataset_max_images,
        max_bytes=plan.dataset_bytes,
        max_pixels=state.settings.max_image_pixels,
    )
    job_id = tuning.new_id("ft")
    key = tenant_key(owner.tenant_id, "datasets", f"{job_id}.zip")
    # One of the tenant's turns at checking images (its tier's concurrency, in this gateway):
    # the job limit is looked at before a picture is decoded, and the dataset is decoded in
    # the gateway's checking threads, so that a tenant's uploads wait for each other, not
    # for a CPU that others share.
    async with state.decoder.turn(owner):
        async with async_transaction(state.sessions) as session:
            active = await tuning.active_count(session, owner.tenant_id)
        if active >= plan.training_jobs:
            raise _job_limit(plan)
        try:
            examples = await state.decoder.in_thread(dataset.validate, source, limits)
        except dataset.DatasetError as exc:
            error = PayloadTooLarge if exc.too_large else BadRequest
            raise error(str(exc), param="dataset") from None
        await anyio.to_thread.run_sync(state.storage.put_file, key, source, plan.dataset_bytes)
        try:
            async with async_transaction(state.sessions) as session:
                job = await tuning.create(
                    session,
                    job_id=job_id,
                    tenant_id=owner.tenant_id,
                    api_key_id=owner.key_id,
                    model=model_name,
                    params=params,
                    dataset_key=key,
                    dataset_images=len(examples),
                    dataset_bytes=size,
                    max_active=plan.training_jobs,
                )
                view = job_view(job)
        except tuning.LimitReached:
            await anyio.to_thread.run_sync(state.storage.delete, key)
            raise _job_limit(plan) from None
        except BaseException:
            await anyio.to_thread.run_sync(state.storage.delete, key)
            raise
    try:  # enqueued only after the commit it depends on
        await anyio.to_thread.run_sync(send_training, state.celery, job_id)
    except Exception as exc:
        async with async_transaction(state.sessions) as session:
            job = await tuning.get(session, owner.tenant_id, job_id)
            await tuning.request_cancel(session, job)
            job.error = "could not be queued"
        await anyio.to_thread.run_sync(state.storage.delete, key)
        raise Unavailable(f"the training queue is unavailable ({exc}); try again") from exc
    return JSONResponse(view, status_code=201)


@router.get(JOBS, response_model=objects.Page[objects.FineTuningJob])
async def list_jobs(
    owner: InferenceKey,
    session: SessionDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict:
    """The tenant's fine-tuning jobs, newest first, `limit` at a time; the next page starts
    `after` the last id of this one."""
    mark = None
    if after is not None:
        mark = await tuning.get(session, owner.tenant_id, after)
        if mark is None:
            raise NotFound(f"field 'after': no fine-tuning job '{after}'", param="after")
    jobs = await tuning.list_for(session, owner.tenant_id, limit + 1, mark)
    return list_page([job_view(job) for job in jobs[:limit]], len(jobs) > limit)


@router.get(JOBS + "/{job_id}", response_model=objects.FineTuningJob)
async def get(job_id: str, owner: InferenceKey, session: SessionDep) -> dict:
    job = await tuning.get(session, owner.tenant_id, job_id)
    if job is None:
        raise NotFound(f"fine-tuning job {job_id} not found")
    return job_view(job, await tuning.segments(session, job_id))


@router.post(JOBS + "/{job_id}/cancel", response_model=objects.FineTuningJob)
async def cancel(job_id: str, owner: InferenceKey, state: StateDep) -> dict:
    """A queued job never runs; a running one stops at its next step and is billed for the
    steps it ran. A finished job is left as it is. (Its own transaction: the dataset goes only
    once the cancellation is committed.)"""
    async with async_transaction(state.sessions) as session:
        job = await tuning.get(session, owner.tenant_id, job_id)
        if job is None:
            raise NotFound(f"fine-tuning job {job_id} not found")
        was_queued = job.status == QUEUED
        await tuning.request_cancel(session, job)
        view = job_view(job)
    if was_queued:  # it will never run: its dataset goes now (a running one's with its run)
        await anyio.to_thread.run_sync(state.storage.delete, job.dataset_key)
    return view


@router.get("/v1/adapters", response_model=objects.Page[objects.Adapter])
async def list_adapters(owner: InferenceKey, session: SessionDep) -> dict:
    adapters = await tuning.list_adapters(session, owner.tenant_id)
    return list_page([adapter_view(a) for a in adapters])


async def _adapter(session: AsyncSession, owner: KeyOwner, adapter_id: str) -> Adapter:
    adapter = await tuning.get_adapter(session, owner.tenant_id, adapter_id)
    if adapter is None:
        raise NotFound(f"adapter {adapter_id} not found")
    return adapter


@router.get("/v1/adapters/{adapter_id}", response_model=objects.Adapter)
async def get_adapter(adapter_id: str, owner: InferenceKey, session: SessionDep) -> dict:
    return adapter_view(await _adapter(session, owner, adapter_id))


@router.get("/v1/adapters/{adapter_id}/content")
async def adapter_content(
    adapter_id: str, owner: InferenceKey, state: StateDep, session: SessionDep
) -> Response:
    """The adapter's weights: diffusers' LoRA format (safetensors), loadable elsewhere too."""
    adapter = await _adapter(session, owner, adapter_id)
    data = await anyio.to_thread.run_sync(state.storage.get, adapter.key)
    return Response(
        data,
        media_type="application/octet-stream",
        headers={"Content-Disposition": f'attachment; filename="{adapter.id}.safetensors"'},
    )


@router.delete("/v1/adapters/{adapter_id}", response_model=objects.AdapterDeleted)
async def delete_adapter(adapter_id: str, owner: InferenceKey, state: StateDep) -> dict:
    """(Its own transaction: the file goes only once the adapter's row is gone.)"""
    async with async_transaction(state.sessions) as session:
        adapter = await tuning.get_adapter(session, owner.tenant_id, adapter_id)
        if adapter is None:
            raise NotFound(f"adapter {adapter_id} not found")
        key = adapter.key
        await tuning.delete_adapter(session, adapter)
    await anyio.to_thread.run_sync(state.storage.delete, key)
    return {"id": adapter_id, "object": "adapter", "deleted": True}
