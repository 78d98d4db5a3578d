"""Batches (`/v1/batches`): a JSONL file of requests, run as jobs at lower priority, with one
result line per input line.

Each input line is a job (`{"custom_id", "type": "chat"|"images", "input": {...}}`) or in
OpenAI's batch form (`{"custom_id", "method": "POST", "url": "/v1/chat/completions" or
"/api/images", "body": {...}}`). Every line is checked at upload; a bad one is reported on its
own result line and the rest run. The job schedulers start a batch's next line only when the
tenant has no ordinary job waiting and a slot is free, so a batch never delays interactive
work, and it still counts against the tenant's concurrency. Inputs and results are kept in
storage (`tenants/<id>/batches/<batch id>/`); the batch's state in Redis, for
GPUHOST_BATCH_RETENTION_SECONDS after it ends. Tenant-scoped: another tenant's id is a 404.
"""

import json
import logging
import re
import tempfile
import time
from collections.abc import Iterator
from typing import Annotated, BinaryIO

import anyio
from fastapi import APIRouter, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response

from api.deferred.jobs import JobCreate, job_spec
from api.deps import InferenceKey, StateDep
from api.errors import ApiError, BadRequest, Conflict, PayloadTooLarge
from api.inputs.wire import new_request_id
from api.pipeline import store
from api.pipeline.batch_runner import ENDED, stored
from api.pipeline.queue_wait import room_in_line
from api.pipeline.submit import check_quota
from api.state import AppState

log = logging.getLogger(__name__)
THREAD_BYTES = 64 * 1024  # a line this long is read (JSON) in a thread, off the event loop
CUSTOM_ID = re.compile(r'"custom_id"\s*:\s*"([^"\\]{1,200})"')
router = APIRouter(prefix="/v1/batches", tags=["batches"])

URLS = {"/v1/chat/completions": "chat", "/api/images": "images"}


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


async def _check_line(state: AppState, owner, number: int, raw: str) -> tuple[str, dict]:
    """(custom_id, the job's spec) for a line, or raise with the message its result gets. A
    long line is read (JSON) in a thread: the event loop serves the others meanwhile."""
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
    if "url" in line:
        if line.get("method", "POST") != "POST" or line["url"] not in URLS:
            raise BadRequest(f"'url' must be one of {sorted(URLS)} with method POST")
        kind, body = URLS[line["url"]], line.get("body")
    else:
        kind, body = line.get("type"), line.get("input")
    if kind not in ("chat", "images") or not isinstance(body, dict):
        raise BadRequest("a line needs 'type' (chat or images) and 'input' (an object)")
    create = JobCreate(type=kind, input=body)
    spec, model = await job_spec(state, create, owner, f"line-{number}")
    return custom_id, {"type": kind, "model": model, "spec": spec.model_dump(mode="json")}


def _view(batch_id: str, record: dict) -> dict:
    status = record["status"]
    return {
        "id": batch_id,
        "object": "batch",
        "status": status,
        "created_at": int(float(record["created_at"])),
        "finished_at": int(float(record["finished_at"])) if record.get("finished_at") else None,
        "request_counts": {
            "total": int(record["total"]),
            "completed": int(record["completed"]),
            "failed": int(record["failed"]),
        },
        "output_url": f"/v1/batches/{batch_id}/output" if status in ENDED else None,
    }


@router.post("", status_code=201)
async def create(
    owner: InferenceKey, state: StateDep, file: Annotated[UploadFile, File()]
) -> JSONResponse:
    """Upload a JSONL file of requests (multipart field `file`) and run them."""
    tenant = str(owner.tenant_id)
    await room_in_line(state, tenant, await check_quota(state, owner))
    # Read line by line from the upload's spooled file (on disk past 1 MiB): the file is never
    # whole in memory, nor are the checked lines, which go to a spooled file of their own.
    source = file.file
    most = state.settings.max_body_bytes  # a line is one request
    count = await anyio.to_thread.run_sync(lambda: sum(1 for _ in _lines(source, most)))
    if not count:
        raise BadRequest("file: no requests in it (one JSON object per line)", param="file")
    limit = state.settings.batch_max_lines
    if count > limit:
        raise BadRequest(f"file: {count} lines; the limit is {limit}", param="file")
    seen = set()
    with tempfile.SpooledTemporaryFile(max_size=1024 * 1024) as specs:
        lines = _lines(source, most)
        for number in range(count):
            raw = await anyio.to_thread.run_sync(next, lines)  # reading the file: off the loop
            try:
                custom_id, job = await _check_line(state, owner, number, raw)
                if custom_id in seen:
                    raise BadRequest(f"custom_id {custom_id!r} is used by an earlier line")
                seen.add(custom_id)
                line = {"custom_id": custom_id, **job}
            except (ApiError, RequestValidationError) as exc:
                error = f"line {number + 1}: {_error_text(exc)}"
                line = {"custom_id": _custom_id(raw), "error": error}
            specs.write(("\n" if number else "").encode() + json.dumps(line).encode())
        batch_id = "batch_" + new_request_id()[:24]
        key = stored(tenant, batch_id, "specs.jsonl")
        await anyio.to_thread.run_sync(state.storage.put_file, key, specs)
    record = {
        "tenant_id": tenant,
        "tier": owner.tier,
        "status": "in_progress",
        "created_at": str(time.time()),
        "total": str(count),
        "next": "0",
        "completed": "0",
        "failed": "0",
        # promised at creation: whichever gateway ends the batch keeps it this long
        "retention": str(state.settings.batch_retention_seconds),
    }
    await store.add_batch(state.redis, batch_id, record, time.time())
    return JSONResponse(_view(batch_id, record), status_code=201)


@router.get("")
async def list_batches(
    owner: InferenceKey, state: StateDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict:
    tenant = str(owner.tenant_id)

    async def view(batch_id: str) -> dict:
        return _view(batch_id, await store.batch_record(state.redis, batch_id, tenant))

    ids = await store.tenant_batch_ids(state.redis, tenant, limit)
    return {"object": "list", "data": await store.views_of(ids, view)}


@router.get("/{batch_id}")
async def get(batch_id: str, owner: InferenceKey, state: StateDep) -> dict:
    return _view(batch_id, await store.batch_record(state.redis, batch_id, str(owner.tenant_id)))


@router.post("/{batch_id}/cancel")
async def cancel(batch_id: str, owner: InferenceKey, state: StateDep) -> dict:
    """Lines not started never run; running ones are cancelled (billed for what they ran).
    The batch ends `cancelled`, its output holding every line's result so far."""
    tenant = str(owner.tenant_id)
    record = await store.batch_record(state.redis, batch_id, tenant)
    if record["status"] == "in_progress":
        await store.cancel_batch(state.redis, batch_id)
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
    key = stored(tenant, batch_id, "output.jsonl")
    data = await anyio.to_thread.run_sync(state.storage.get, key)
    return Response(data, media_type="application/jsonl")
