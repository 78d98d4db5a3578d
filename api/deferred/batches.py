"""Batches (`/v1/batches`), as OpenAI's Batch API has them: the lines of a file uploaded to
/v1/files (purpose batch), run as jobs at lower priority, one result line each.

`POST /v1/batches` with JSON (`input_file_id`, `endpoint`, `completion_window` "24h",
`metadata`) takes lines in OpenAI's form to that endpoint (`{"custom_id", "method": "POST",
"url", "body"}`; /v1/chat/completions, /v1/completions, /v1/images/generations); each line's
answer is the object that endpoint returns to a synchronous call. The earlier form, a JSONL
file sent here (multipart `file`), still works: it is kept as a file and run the same way, its
lines to any of those endpoints, to /api/images, or as jobs (`{"custom_id", "type":
"chat"|"images", "input"}`, answered `{"output", "gpu_seconds", "queue_seconds"}`).

Every line is checked when the batch is made; a bad one is reported on its own result line and
the rest run. The job schedulers start a batch's next line only when the tenant has no
ordinary job waiting and a slot is free, so a batch never delays interactive work, and it
still counts against the tenant's concurrency. Lines not started within the completion window
end `expired`. When the batch ends, its answers are a file of purpose `batch_output`
(`output_file_id`) and its failures another (`error_file_id`). Its working files are in storage
(`tenants/<id>/batches/<batch id>/`); its state in Redis, for GPUHOST_BATCH_RETENTION_SECONDS
after it ends. Tenant-scoped: another tenant's id is a 404.
"""

import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Iterator
from typing import Annotated, BinaryIO, Literal

import anyio
from fastapi import APIRouter, Query, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel, ConfigDict, Field
from starlette.datastructures import UploadFile

from api.deferred.files import file_for, keep_upload, remove
from api.deferred.jobs import JobCreate, job_spec
from api.deps import InferenceKey, StateDep
from api.errors import (
    OPENAI_ERRORS,
    ApiError,
    BadRequest,
    Conflict,
    NotFound,
    OpenAIRoute,
    PayloadTooLarge,
)
from api.inputs.json_body import json_body, openapi_body, validated
from api.inputs.wire import list_page, new_request_id
from api.openai import batch_lines
from api.openai.batch_lines import ENDPOINTS
from api.openai.objects import Batch, Page
from api.openai.schemas import CompletionRequest, GenerationsRequest
from api.pipeline import store
from api.pipeline.batch_runner import ENDED
from api.pipeline.batch_runner import stored as stored_key
from api.pipeline.queue_wait import room_in_line
from api.pipeline.submit import check_quota
from api.sd.serving import ImageServing
from api.state import AppState

log = logging.getLogger(__name__)
THREAD_BYTES = 64 * 1024  # a line this long is read (JSON) in a thread, off the event loop
CUSTOM_ID = re.compile(r'"custom_id"\s*:\s*"([^"\\]{1,200})"')
router = APIRouter(
    prefix="/v1/batches", tags=["batches"], route_class=OpenAIRoute, responses=OPENAI_ERRORS
)

# What a line in OpenAI's form may name: OpenAI's endpoints (its answer is the endpoint's own
# body), and /api/images (this server's native image answer).
URLS = (*ENDPOINTS, "/api/images")
COMPLETION_WINDOW = 24 * 3600  # a line not started within it ends `expired`


def _error_text(exc: Exception) -> str:
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"field '{where}': {first.get('msg')}"
    return str(exc)


class Oversized(str):
    """A line longer than a request may be (its text is not kept: only its start)."""


def _lines(source: BinaryIO, max_bytes: int) -> Iterator[str]:
    """The file's non-blank lines (split at newlines only), as text; 400 at one not UTF-8. A
    line over `max_bytes` is read through without being kept (an `Oversized` of its first
    bytes), so that memory holds one request's worth at most."""
    source.seek(0)
    number = 0
    while raw := source.readline(max_bytes + 1):
        number += 1
        if len(raw) > max_bytes and not raw.endswith(b"\n"):
            while (rest := source.readline(1024 * 1024)) and not rest.endswith(b"\n"):
                pass  # the rest of the line, read and let go
            yield Oversized(raw[:200].decode("utf-8", "replace"))
            continue
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"file: line {number} is not UTF-8 text", param="file") from None
        if text.strip():
            yield text


def _custom_id(raw: str) -> str | None:
    """A refused line's custom_id, if it can be read (from its start, for a long line)."""
    if isinstance(raw, Oversized) or len(raw) >= THREAD_BYTES:
        found = CUSTOM_ID.search(raw[:4096])
        return found.group(1) if found else None
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line.get("custom_id") if isinstance(line, dict) else None


async def _line_job(state: AppState, owner, url: str, body: dict, job_id: str) -> dict:
    """The job an OpenAI-form line's body makes, checked as its endpoint checks a request."""
    if url == batch_lines.COMPLETIONS:
        completion = validated(CompletionRequest, body, ("body",))
        if not state.serves(completion.model):
            raise NotFound(f"The model '{completion.model}' does not exist", param="model")
        if completion.n > 1 or completion.stream:
            raise BadRequest("field 'body': a batch line gives one answer, not streamed")
        spec = completion.to_job(owner, job_id)
        echo = spec.messages[-1].content if completion.echo else ""
        job = {"type": "chat", "model": completion.model, "spec": spec.model_dump(mode="json")}
        return job | {"echo": echo}
    if url == batch_lines.IMAGES:
        generations = validated(GenerationsRequest, body, ("body",))
        if generations.response_format != "b64_json":
            raise BadRequest(
                "field 'body.response_format': a batch's images come as b64_json (a URL "
                "would expire before the output is read)"
            )
        spec = await ImageServing(state).job(generations.native(), owner, job_id)
        return {"type": "images", "model": spec.model, "spec": spec.model_dump(mode="json")}
    kind = "chat" if url == batch_lines.CHAT else "images"  # /api/images: the native form
    spec, model = await job_spec(state, JobCreate(type=kind, input=body), owner, job_id)
    return {"type": kind, "model": model, "spec": spec.model_dump(mode="json")}


async def _check_line(
    state: AppState, owner, number: int, raw: str, endpoint: str | None
) -> tuple[str, dict]:
    """(custom_id, the job's spec) for a line, or raise with the message its result gets. A
    long line is read (JSON) in a thread: the event loop serves the others meanwhile. A batch
    made for one `endpoint` takes only OpenAI-form lines to it."""
    if isinstance(raw, Oversized):
        limit = state.settings.max_body_bytes
        raise PayloadTooLarge(f"the line is over {limit} bytes, the most a request may be")
    try:
        if len(raw) < THREAD_BYTES:
            line = json.loads(raw)
        else:
            line = await anyio.to_thread.run_sync(json.loads, raw)
    except ValueError:
        raise BadRequest("not JSON") from None
    if not isinstance(line, dict):
        raise BadRequest("a line must be a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not 0 < len(custom_id) <= 200:
        raise BadRequest("'custom_id' must be a string of 1 to 200 characters")
    if endpoint is not None and line.get("url") != endpoint:
        raise BadRequest(f"'url' must be this batch's endpoint, {endpoint} (method POST)")
    if "url" in line:
        if line.get("method", "POST") != "POST" or line["url"] not in URLS:
            raise BadRequest(f"'url' must be one of {sorted(URLS)} with method POST")
        if not isinstance(line.get("body"), dict):
            raise BadRequest("a line needs 'body' (an object): the request to its 'url'")
        job = await _line_job(state, owner, line["url"], line["body"], f"line-{number}")
        return custom_id, job | {"endpoint": line["url"] if line["url"] in ENDPOINTS else None}
    kind, body = line.get("type"), line.get("input")
    if kind not in ("chat", "images") or not isinstance(body, dict):
        raise BadRequest("a line needs 'type' (chat or images) and 'input' (an object)")
    spec, model = await job_spec(state, JobCreate(type=kind, input=body), owner, f"line-{number}")
    return custom_id, {"type": kind, "model": model, "spec": spec.model_dump(mode="json")}


def _when(record: dict, name: str) -> int | None:
    return int(float(record[name])) if record.get(name) else None


def _view(batch_id: str, record: dict) -> dict:
    """OpenAI's batch object (with `output_url`, where this server's own form reads it)."""
    status = record["status"]
    return {
        "id": batch_id,
        "object": "batch",
        "endpoint": record.get("endpoint") or None,
        "errors": None,
        "input_file_id": record.get("input_file_id"),
        "completion_window": "24h",
        "status": status,
        "output_file_id": record.get("output_file_id") or None,
        "error_file_id": record.get("error_file_id") or None,
        "created_at": _when(record, "created_at"),
        "in_progress_at": _when(record, "created_at"),
        "expires_at": _when(record, "expires_at"),
        "finalizing_at": _when(record, "finalizing_at"),
        "completed_at": _when(record, "finished_at") if status == "completed" else None,
        "failed_at": None,
        "expired_at": _when(record, "finished_at") if status == "expired" else None,
        "cancelling_at": _when(record, "cancelling_at"),
        "cancelled_at": _when(record, "finished_at") if status == "cancelled" else None,
        "finished_at": _when(record, "finished_at"),
        "request_counts": {
            "total": int(record["total"]),
            "completed": int(record["completed"]),
            "failed": int(record["failed"]),
        },
        "metadata": json.loads(record["metadata"]) if record.get("metadata") else None,
        "output_url": f"/v1/batches/{batch_id}/output" if status in ENDED else None,
    }


class BatchCreate(BaseModel):
    """OpenAI's batch: the lines of an uploaded file (purpose `batch`), all to one endpoint."""

    model_config = ConfigDict(extra="forbid")

    input_file_id: str = Field(max_length=64)
    endpoint: Literal["/v1/chat/completions", "/v1/completions", "/v1/images/generations"]
    completion_window: Literal["24h"]
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(None, max_length=16)


@router.post("", status_code=201, openapi_extra=openapi_body(BatchCreate), response_model=Batch)
async def create(owner: InferenceKey, state: StateDep, request: Request) -> JSONResponse:
    """Run the lines of a file uploaded to /v1/files (JSON: OpenAI's `input_file_id`,
    `endpoint`, `completion_window`), or of a JSONL file sent here (multipart field `file`:
    lines to any endpoint, or in this server's job form; kept as a file of purpose batch)."""
    tenant = str(owner.tenant_id)
    await room_in_line(state, tenant, await check_quota(state, owner))
    if request.headers.get("content-type", "").startswith("multipart/form-data"):
        upload = (await request.form()).get("file")
        if not isinstance(upload, UploadFile):
            raise BadRequest("field 'file': a JSONL file of requests is required", param="file")
        stored = await keep_upload(state, owner, upload, "batch")
        try:
            record = await _make(state, owner, stored, None, None)
        except BaseException:
            with anyio.CancelScope(shield=True):
                await remove(state, stored)
            raise
    else:
        body = await json_body(BatchCreate)(request)
        stored = await file_for(state, owner, body.input_file_id, "batch", "input_file_id")
        record = await _make(state, owner, stored, body.endpoint, body.metadata)
    return JSONResponse(_view(record["id"], record), status_code=201)


async def _make(
    state: AppState, owner, stored, endpoint: str | None, metadata: dict | None
) -> dict:
    """Check the stored file's lines (each bad one becomes its own error line) and start the
    batch. The file is copied to a spooled file (on disk past 1 MiB) and read line by line:
    never whole in memory, nor are the checked lines, which go to a spooled file of their
    own."""
    tenant = str(owner.tenant_id)
    with (
        tempfile.SpooledTemporaryFile(max_size=1024 * 1024) as source,
        tempfile.SpooledTemporaryFile(max_size=1024 * 1024) as specs,
    ):

        def copy() -> None:
            with state.storage.open(stored.storage_key) as kept:
                shutil.copyfileobj(kept, source, 1024 * 1024)

        await anyio.to_thread.run_sync(copy)
        most = state.settings.max_body_bytes  # a line is one request
        count = await anyio.to_thread.run_sync(lambda: sum(1 for _ in _lines(source, most)))
        if not count:
            raise BadRequest("file: no requests in it (one JSON object per line)", param="file")
        limit = state.settings.batch_max_lines
        if count > limit:
            raise BadRequest(f"file: {count} lines; the limit is {limit}", param="file")
        seen = set()
        lines = _lines(source, most)
        for number in range(count):
            raw = await anyio.to_thread.run_sync(next, lines)  # reading the file: off the loop
            try:
                custom_id, job = await _check_line(state, owner, number, raw, endpoint)
                if custom_id in seen:
                    raise BadRequest(f"custom_id {custom_id!r} is used by an earlier line")
                seen.add(custom_id)
                line = {"custom_id": custom_id, **job}
            except (ApiError, RequestValidationError) as exc:
                error = f"line {number + 1}: {_error_text(exc)}"
                line = {"custom_id": _custom_id(raw), "error": error}
            specs.write(("\n" if number else "").encode() + json.dumps(line).encode())
        batch_id = "batch_" + new_request_id()[:24]
        key = stored_key(tenant, batch_id, "specs.jsonl")
        await anyio.to_thread.run_sync(state.storage.put_file, key, specs)
    now = time.time()
    record = {
        "id": batch_id,
        "tenant_id": tenant,
        "tier": owner.tier,
        "status": "in_progress",
        "endpoint": endpoint or "",
        "input_file_id": stored.id,
        "metadata": json.dumps(metadata) if metadata else "",
        "created_at": str(now),
        "expires_at": str(now + COMPLETION_WINDOW),
        "total": str(count),
        "next": "0",
        "completed": "0",
        "failed": "0",
        # promised at creation: whichever gateway ends the batch keeps it this long
        "retention": str(state.settings.batch_retention_seconds),
    }
    await store.add_batch(state.redis, batch_id, record, now)
    return record


@router.get("", response_model=Page[Batch])
async def list_batches(
    owner: InferenceKey,
    state: StateDep,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    after: str | None = None,
) -> dict:
    """The tenant's batches, newest first, `limit` at a time; the next page starts `after`
    the last id of this one."""
    tenant = str(owner.tenant_id)

    async def view(batch_id: str) -> dict:
        return _view(batch_id, await store.batch_record(state.redis, batch_id, tenant))

    ids, more = await store.tenant_batch_ids(state.redis, tenant, limit, after)
    return list_page(await store.views_of(ids, view), more)


@router.get("/{batch_id}", response_model=Batch)
async def get(batch_id: str, owner: InferenceKey, state: StateDep) -> dict:
    return _view(batch_id, await store.batch_record(state.redis, batch_id, str(owner.tenant_id)))


@router.post("/{batch_id}/cancel", response_model=Batch)
async def cancel(batch_id: str, owner: InferenceKey, state: StateDep) -> dict:
    """Lines not started never run (nor are billed); running ones finish, as OpenAI's do. The
    batch ends `cancelled` once they have, its output holding every line's result."""
    tenant = str(owner.tenant_id)
    record = await store.batch_record(state.redis, batch_id, tenant)
    if record["status"] == "in_progress":
        record["cancelling_at"] = await store.cancel_batch(state.redis, batch_id)
        record["status"] = "cancelling"
    return _view(batch_id, record)


@router.get("/{batch_id}/output")
async def output(batch_id: str, owner: InferenceKey, state: StateDep) -> Response:
    """One JSON line per input line, in input order: `custom_id`, and `response`
    (`status_code`, `body`) or `error`."""
    tenant = str(owner.tenant_id)
    record = await store.batch_record(state.redis, batch_id, tenant)
    if record["status"] not in ENDED:
        raise Conflict(f"batch {batch_id} is {record['status']}; its output comes when it ends")
    key = stored_key(tenant, batch_id, "output.jsonl")
    data = await anyio.to_thread.run_sync(state.storage.get, key)
    return Response(data, media_type="application/jsonl")
