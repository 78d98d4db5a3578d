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

import contextlib
import json
import logging
import time
from typing import Annotated

import anyio
from cachetools import LRUCache
from fastapi import APIRouter, File, Query, UploadFile
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from redis.exceptions import LockError

from api import async_jobs
from api.deps import InferenceKey, StateDep
from api.dispatch import check_quota
from api.errors import ApiError, BadRequest, Conflict, NotFound, TooManyRequests
from api.ollama.schemas import new_request_id
from api.state import AppState
from storage import tenant_key
from workers.contract import cancel_key

log = logging.getLogger(__name__)
router = APIRouter(prefix="/v1/batches", tags=["batches"])

ACTIVE = "gpuhost:batches:active"
EXPIRING = "gpuhost:batches:expiring"  # ended batches' storage folders, by when they go
SWEEP_EVERY = 1.0
LOCK_SECONDS = 30  # a gateway that died advancing a batch holds it up at most this long
URLS = {"/v1/chat/completions": "chat", "/api/images": "images"}
ENDED = ("completed", "canceled")
SPECS_CACHED = 8  # batches whose lines a gateway keeps in memory


def batch_key(batch_id: str) -> str:
    return f"gpuhost:batches:{batch_id}"


def running_key(batch_id: str) -> str:
    return f"gpuhost:batches:{batch_id}:running"  # line job id -> line index


def index_key(tenant_id: str) -> str:
    return f"gpuhost:batches:by-tenant:{tenant_id}"


def _folder(tenant: str, batch_id: str) -> str:
    return tenant_key(tenant, "batches", batch_id)


def _line_key(tenant: str, batch_id: str, index: int) -> str:
    return tenant_key(tenant, "batches", batch_id, "lines", f"{index:08d}.json")


def _error_text(exc: Exception) -> str:
    if isinstance(exc, RequestValidationError):
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first.get("loc", ()))
        return f"field '{where}': {first.get('msg')}"
    return str(exc)


def _custom_id(raw: str) -> str | None:
    try:
        line = json.loads(raw)
    except ValueError:
        return None
    return line.get("custom_id") if isinstance(line, dict) else None


async def _check_line(state: AppState, owner, number: int, raw: str) -> tuple[str, dict]:
    """(custom_id, the job's spec) for a line, or raise with the message its result gets."""
    try:
        line = json.loads(raw)
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
    create = async_jobs.JobCreate(type=kind, input=body)
    spec, model = await async_jobs.job_spec(state, create, owner, f"line-{number}")
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


async def _record(state: AppState, batch_id: str, tenant: str) -> dict:
    raw = await state.redis.hgetall(batch_key(batch_id))
    record = {k.decode(): v.decode() for k, v in raw.items()}
    if not record or record["tenant_id"] != tenant:
        raise NotFound(f"batch {batch_id} not found")
    return record


@router.post("", status_code=201)
async def create(
    owner: InferenceKey, state: StateDep, file: Annotated[UploadFile, File()]
) -> JSONResponse:
    """Upload a JSONL file of requests (multipart field `file`) and run them."""
    tenant = str(owner.tenant_id)
    await check_quota(state, owner)
    try:
        text = (await file.read()).decode("utf-8")
    except UnicodeDecodeError:
        raise BadRequest("file: not UTF-8 text", param="file") from None
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        raise BadRequest("file: no requests in it (one JSON object per line)", param="file")
    limit = state.settings.batch_max_lines
    if len(lines) > limit:
        raise BadRequest(f"file: {len(lines)} lines; the limit is {limit}", param="file")
    checked, seen = [], set()
    for number, raw in enumerate(lines):
        try:
            custom_id, job = await _check_line(state, owner, number, raw)
            if custom_id in seen:
                raise BadRequest(f"custom_id {custom_id!r} is used by an earlier line")
            seen.add(custom_id)
            checked.append({"custom_id": custom_id, **job})
        except (ApiError, RequestValidationError) as exc:
            checked.append(
                {"custom_id": _custom_id(raw), "error": f"line {number + 1}: {_error_text(exc)}"}
            )
    batch_id = "batch_" + new_request_id()[:24]
    specs = "\n".join(json.dumps(line) for line in checked).encode()
    await anyio.to_thread.run_sync(
        state.storage.put, tenant_key(tenant, "batches", batch_id, "specs.jsonl"), specs
    )
    record = {
        "tenant_id": tenant,
        "tier": owner.tier,
        "status": "in_progress",
        "created_at": str(time.time()),
        "total": str(len(checked)),
        "next": "0",
        "completed": "0",
        "failed": "0",
        # promised at creation: whichever gateway ends the batch keeps it this long
        "retention": str(state.settings.batch_retention_seconds),
    }
    pipe = state.redis.pipeline(transaction=True)
    pipe.hset(batch_key(batch_id), mapping=record)
    pipe.zadd(index_key(tenant), {batch_id: time.time()})
    pipe.sadd(ACTIVE, batch_id)
    await pipe.execute()
    return JSONResponse(_view(batch_id, record), status_code=201)


@router.get("")
async def list_batches(
    owner: InferenceKey, state: StateDep, limit: Annotated[int, Query(ge=1, le=100)] = 20
) -> dict:
    tenant = str(owner.tenant_id)
    views = []
    for raw in await state.redis.zrevrange(index_key(tenant), 0, limit - 1):
        try:
            views.append(_view(raw.decode(), await _record(state, raw.decode(), tenant)))
        except NotFound:  # expired
            continue
    return {"object": "list", "data": views}


@router.get("/{batch_id}")
async def get(batch_id: str, owner: InferenceKey, state: StateDep) -> dict:
    return _view(batch_id, await _record(state, batch_id, str(owner.tenant_id)))


@router.post("/{batch_id}/cancel")
async def cancel(batch_id: str, owner: InferenceKey, state: StateDep) -> dict:
    """Lines not started never run; running ones are cancelled (billed for what they ran).
    The batch ends `canceled`, its output holding every line's result so far."""
    tenant = str(owner.tenant_id)
    record = await _record(state, batch_id, tenant)
    if record["status"] == "in_progress":
        await state.redis.hset(batch_key(batch_id), "status", "canceling")
        record["status"] = "canceling"
    return _view(batch_id, record)


@router.get("/{batch_id}/output")
async def output(batch_id: str, owner: InferenceKey, state: StateDep) -> Response:
    """One JSON line per input line, in input order: `custom_id`, and `response`
    (`status_code`, `body`) or `error`."""
    tenant = str(owner.tenant_id)
    record = await _record(state, batch_id, tenant)
    if record["status"] not in ENDED:
        raise Conflict(f"batch {batch_id} is {record['status']}; its output comes when it ends")
    key = tenant_key(tenant, "batches", batch_id, "output.jsonl")
    data = await anyio.to_thread.run_sync(state.storage.get, key)
    return Response(data, media_type="application/jsonl")


class BatchRunner:
    """Part of every gateway's job scheduler: starts batch lines when nothing else waits,
    collects their results, and writes a batch's output when its last line ends."""

    def __init__(self, state: AppState, scheduler):
        self.state = state
        self.scheduler = scheduler
        # Lines of the batches this gateway advances, read once from storage: the few most
        # recent, and only while the batch is active (another gateway may end it).
        self._specs: LRUCache[str, list[dict]] = LRUCache(maxsize=SPECS_CACHED)
        self._swept_at = 0.0

    async def pass_once(self) -> None:
        await self._remove_expired()
        active = {raw.decode() for raw in await self.state.redis.smembers(ACTIVE)}
        for gone in set(self._specs) - active:
            del self._specs[gone]
        for batch_id in active:
            # One gateway at a time advances a batch: reading `next` and the running lines and
            # acting on them is not atomic (two could start a line twice, or count it twice).
            lock = self.state.redis.lock(f"{batch_key(batch_id)}:lock", timeout=LOCK_SECONDS)
            if not await lock.acquire(blocking=False):
                continue
            try:
                await self._advance_locked(batch_id)
            except Exception:  # this batch waits for the next pass; the others go on
                log.exception("batch %s could not advance", batch_id)
            finally:
                with contextlib.suppress(LockError):  # expired: another may hold it now
                    await lock.release()

    async def _advance_locked(self, batch_id: str) -> None:
        raw = await self.state.redis.hgetall(batch_key(batch_id))
        record = {k.decode(): v.decode() for k, v in raw.items()}
        if not record:
            await self.state.redis.srem(ACTIVE, batch_id)
            return
        if record["status"] in ENDED:  # ended by another gateway since the listing
            return
        await self._advance(batch_id, record)

    async def _remove_expired(self) -> None:
        """Ended batches' files go when their retention is over (their records expire too)."""
        if time.monotonic() - self._swept_at < SWEEP_EVERY:
            return
        self._swept_at = time.monotonic()
        redis = self.state.redis
        for raw in await redis.zrangebyscore(EXPIRING, "-inf", time.time()):
            if not await redis.zrem(EXPIRING, raw):
                continue  # another gateway took it
            try:
                await anyio.to_thread.run_sync(self.state.storage.delete, raw.decode())
            except Exception:
                await redis.zadd(EXPIRING, {raw: time.time()})  # tried again next sweep
                raise

    async def _specs_of(self, batch_id: str, tenant: str) -> list[dict]:
        if batch_id not in self._specs:
            key = tenant_key(tenant, "batches", batch_id, "specs.jsonl")
            data = await anyio.to_thread.run_sync(self.state.storage.get, key)
            self._specs[batch_id] = [json.loads(line) for line in data.splitlines()]
        return self._specs[batch_id]

    async def _result(self, batch_id: str, tenant: str, index: int, line: dict, ok: bool) -> None:
        storage = self.state.storage
        data = json.dumps(line).encode()
        await anyio.to_thread.run_sync(storage.put, _line_key(tenant, batch_id, index), data)
        await self.state.redis.hincrby(batch_key(batch_id), "completed" if ok else "failed", 1)

    async def _advance(self, batch_id: str, record: dict) -> None:
        redis, tenant = self.state.redis, record["tenant_id"]
        specs = await self._specs_of(batch_id, tenant)
        canceling = record["status"] == "canceling"
        for raw_job, raw_index in (await redis.hgetall(running_key(batch_id))).items():
            job_id, index = raw_job.decode(), int(raw_index)
            if canceling:
                retention = self.state.settings.stream_retention_seconds
                await redis.set(cancel_key(job_id), "1", ex=retention)
            view = await async_jobs.job_view(self.state, job_id, tenant)
            if view["status"] not in async_jobs.FINISHED:
                continue
            ok = view["status"] == "succeeded"
            body = {
                "output": view["output"],
                "gpu_seconds": view["gpu_seconds"],
                "queue_seconds": view["queue_seconds"],
            }
            line = {
                "id": job_id,
                "custom_id": specs[index]["custom_id"],
                "response": {"status_code": 200, "body": body} if ok else None,
                "error": None if ok else {"message": view["error"] or view["status"]},
            }
            await self._result(batch_id, tenant, index, line, ok)
            await redis.hdel(running_key(batch_id), job_id)
        following = int(record["next"])
        total = int(record["total"])
        if canceling:
            for index in range(following, total):
                line = {
                    "id": None,
                    "custom_id": specs[index]["custom_id"],
                    "response": None,
                    "error": {"message": "the batch was cancelled before this line ran"},
                }
                await self._result(batch_id, tenant, index, line, False)
            await redis.hset(batch_key(batch_id), "next", str(total))
        elif following < total and not await redis.llen(async_jobs.waiting_key(tenant)):
            await self._start(batch_id, record, following, specs[following])
        if await redis.hlen(running_key(batch_id)) == 0 and (
            canceling or int(await redis.hget(batch_key(batch_id), "next")) >= total
        ):
            status = "canceled" if canceling else "completed"
            await self._finish(batch_id, record, status)

    async def _start(self, batch_id: str, record: dict, index: int, spec: dict) -> None:
        """The batch's next line: reported at once if it was bad, else run when a slot is free."""
        redis, tenant = self.state.redis, record["tenant_id"]
        if "error" in spec:
            line = {
                "id": None,
                "custom_id": spec["custom_id"],
                "response": None,
                "error": {"message": spec["error"]},
            }
            await self._result(batch_id, tenant, index, line, False)
            await redis.hincrby(batch_key(batch_id), "next", 1)
            return
        job_id = f"{batch_id}-{index}"
        try:
            lease = await self.state.admission.acquire(tenant, record["tier"], job_id)
        except TooManyRequests:
            return  # the tenant's slots are busy: this line waits for the next pass
        spec["spec"]["request_id"] = job_id
        job = {
            "tenant_id": tenant,
            "tier": record["tier"],
            "type": spec["type"],
            "model": spec["model"],
            "created_at": str(time.time()),
            "state": "submitted",
            "spec": json.dumps(spec["spec"]),
        }
        retention = self.state.settings.stream_retention_seconds
        pipe = redis.pipeline(transaction=True)
        pipe.hset(async_jobs.record_key(job_id), mapping=job)
        pipe.expire(async_jobs.record_key(job_id), retention)
        pipe.hset(running_key(batch_id), job_id, index)
        pipe.hincrby(batch_key(batch_id), "next", 1)
        await pipe.execute()
        try:
            await self.scheduler.submit(job_id, job)
        except Exception:
            await self.state.admission.release(lease)
            await redis.hdel(running_key(batch_id), job_id)
            await redis.delete(async_jobs.record_key(job_id))
            await redis.hincrby(batch_key(batch_id), "next", -1)  # tried again next pass
            raise

    async def _finish(self, batch_id: str, record: dict, status: str) -> None:
        storage, tenant, total = self.state.storage, record["tenant_id"], int(record["total"])

        def assemble() -> None:
            lines = [storage.get(_line_key(tenant, batch_id, i)) for i in range(total)]
            storage.put(
                tenant_key(tenant, "batches", batch_id, "output.jsonl"), b"\n".join(lines) + b"\n"
            )
            storage.delete(tenant_key(tenant, "batches", batch_id, "lines"))

        await anyio.to_thread.run_sync(assemble)
        retention = int(record["retention"])
        pipe = self.state.redis.pipeline(transaction=True)
        pipe.hset(batch_key(batch_id), mapping={"status": status, "finished_at": str(time.time())})
        pipe.expire(batch_key(batch_id), retention)
        pipe.srem(ACTIVE, batch_id)
        pipe.zadd(EXPIRING, {_folder(tenant, batch_id): time.time() + retention})
        await pipe.execute()
        self._specs.pop(batch_id, None)
        log.info("batch %s %s (%d lines)", batch_id, status, total)
