"""The batches' side of every gateway's job scheduler (api.pipeline.scheduler): starts a batch's
lines when nothing else waits, collects their results, writes the batch's output when its last
line ends, and deletes ended batches' files when their retention is over."""

import contextlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime

import anyio
from cachetools import LRUCache
from redis.exceptions import LockError

from api.errors import PaymentRequired, TooManyRequests
from api.openai import batch_lines
from api.pipeline import store
from api.pipeline.fleet import BATCH_BAND
from api.pipeline.scheduler import meta
from api.pipeline.submit import take_slot
from api.pipeline.view import FINISHED, job_view
from api.state import AppState
from billing import files as stored_files
from billing.files import BATCH_OUTPUT, StoredFile
from storage import file_key, tenant_key
from workers.keyspace import (
    BATCHES_ACTIVE,
    BATCHES_EXPIRING,
    batch_key,
    batch_lock_key,
    batch_running_key,
)

log = logging.getLogger(__name__)

SWEEP_EVERY = 1.0
LOCK_SECONDS = 30  # a gateway that died advancing a batch holds it up at most this long
SPECS_CACHED = 8  # batches whose lines a gateway keeps in memory
ENDED = ("completed", "cancelled", "expired")


def stored(tenant: str, batch_id: str, *parts: str) -> str:
    """A batch's folder in storage, or a file in it."""
    return tenant_key(tenant, "batches", batch_id, *parts)


def line_key(tenant: str, batch_id: str, index: int) -> str:
    """Where one line's result is kept until the output is written."""
    return stored(tenant, batch_id, "lines", f"{index:08d}.json")


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
        active = {raw.decode() for raw in await self.state.redis.smembers(BATCHES_ACTIVE)}
        for gone in set(self._specs) - active:
            del self._specs[gone]
        for batch_id in active:
            # One gateway at a time advances a batch: reading `next` and the running lines and
            # acting on them is not atomic (two could start a line twice, or count it twice).
            lock = self.state.redis.lock(batch_lock_key(batch_id), timeout=LOCK_SECONDS)
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
        record = await store.batch_record(self.state.redis, batch_id)
        if not record:
            await self.state.redis.srem(BATCHES_ACTIVE, batch_id)
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
        for raw in await redis.zrangebyscore(BATCHES_EXPIRING, "-inf", time.time()):
            if not await redis.zrem(BATCHES_EXPIRING, raw):
                continue  # another gateway took it
            try:
                await anyio.to_thread.run_sync(self.state.storage.delete, raw.decode())
            except Exception:
                await redis.zadd(BATCHES_EXPIRING, {raw: time.time()})  # tried again next sweep
                raise

    async def _specs_of(self, batch_id: str, tenant: str) -> list[dict]:
        if batch_id not in self._specs:
            key = stored(tenant, batch_id, "specs.jsonl")
            data = await anyio.to_thread.run_sync(self.state.storage.get, key)
            self._specs[batch_id] = [json.loads(line) for line in data.splitlines()]
        return self._specs[batch_id]

    async def _result(self, batch_id: str, tenant: str, index: int, line: dict, ok: bool) -> None:
        storage = self.state.storage
        data = json.dumps(line).encode()
        await anyio.to_thread.run_sync(storage.put, line_key(tenant, batch_id, index), data)
        await self.state.redis.hincrby(batch_key(batch_id), "completed" if ok else "failed", 1)

    async def _answered(self, job_id: str, line: dict, view: dict) -> dict:
        """The result line of a line whose job ended: in OpenAI's form, the answer its
        endpoint gives (`api.openai.batch_lines`); in the job form, the job's output."""
        custom_id, created = line["custom_id"], int(view["finished_at"] or time.time())
        if line.get("endpoint"):
            try:
                status, body = await batch_lines.answer(self.state, job_id, line, created)
            except batch_lines.NotAnswered as why:
                return _failed(
                    custom_id, "batch_cancelled", f"the batch was cancelled: {why}", job_id
                )
            response = {"status_code": status, "request_id": job_id, "body": body}
            return {"id": job_id, "custom_id": custom_id, "response": response, "error": None}
        if view["status"] != "succeeded":
            return _failed(custom_id, view["status"], view["error"] or view["status"], job_id)
        body = {
            "output": view["output"],
            "gpu_seconds": view["gpu_seconds"],
            "queue_seconds": view["queue_seconds"],
        }
        response = {"status_code": 200, "request_id": job_id, "body": body}
        return {"id": job_id, "custom_id": custom_id, "response": response, "error": None}

    async def _advance(self, batch_id: str, record: dict) -> None:
        redis, tenant = self.state.redis, record["tenant_id"]
        if record["status"] == "finalizing":  # a gateway stopped while it wrote the output
            await self._finish(batch_id, record, record["ending"])
            return
        specs = await self._specs_of(batch_id, tenant)
        # Cancelled, or the completion window over: lines not started end so (never run, never
        # billed); running ones finish and are answered, as OpenAI's batches do.
        cancelling = record["status"] == "cancelling"
        expiring = not cancelling and float(record.get("expires_at") or "inf") <= time.time()
        for raw_job, raw_index in (await redis.hgetall(batch_running_key(batch_id))).items():
            job_id, index = raw_job.decode(), int(raw_index)
            view = await job_view(self.state, job_id, tenant)
            if view["status"] not in FINISHED:
                continue
            line = await self._answered(job_id, specs[index], view)
            await self._result(batch_id, tenant, index, line, _succeeded(line))
            await redis.hdel(batch_running_key(batch_id), job_id)
        following = int(record["next"])
        total = int(record["total"])
        if cancelling or expiring:
            code, why = (
                ("batch_cancelled", "the batch was cancelled before this line ran")
                if cancelling
                else ("batch_expired", "the batch's completion window ended before this line ran")
            )
            for index in range(following, total):
                line = _failed(specs[index]["custom_id"], code, why)
                await self._result(batch_id, tenant, index, line, False)
            await redis.hset(batch_key(batch_id), "next", str(total))
        elif following < total and not await store.has_waiting(redis, tenant):
            await self._start(batch_id, record, following, specs[following])
        if await redis.hlen(batch_running_key(batch_id)) == 0 and (
            cancelling or int(await redis.hget(batch_key(batch_id), "next")) >= total
        ):
            status = "cancelled" if cancelling else "expired" if expiring else "completed"
            await self._finish(batch_id, record, status)

    async def _start(self, batch_id: str, record: dict, index: int, spec: dict) -> None:
        """The batch's next line: reported at once if it was bad, else run when a slot is free."""
        redis, tenant = self.state.redis, record["tenant_id"]
        if "error" in spec:
            line = _failed(spec["custom_id"], "invalid_request", spec["error"])
            await self._result(batch_id, tenant, index, line, False)
            await redis.hincrby(batch_key(batch_id), "next", 1)
            return
        job_id = f"{batch_id}-{index}"
        spec["spec"]["request_id"] = job_id
        try:  # the tenant's tier and allowance now, not as they were when it was uploaded
            tier = (await self.state.quotas.check(uuid.UUID(tenant), fresh=True)).tier
        except PaymentRequired as refused:
            line = _failed(spec["custom_id"], refused.code, refused.message)
            await self._result(batch_id, tenant, index, line, False)
            await redis.hincrby(batch_key(batch_id), "next", 1)
            return
        job = {
            "tenant_id": tenant,
            "tier": tier,
            "type": spec["type"],
            "model": spec["model"],
            "created_at": str(time.time()),
            "spec": json.dumps(spec["spec"]),
        }
        try:
            lease = await take_slot(self.state, tenant, tier, job_id, meta(job))
        except TooManyRequests:
            return  # the tenant's slots are busy: this line waits for the next pass
        retention = self.state.settings.stream_retention_seconds
        await store.add_line_job(redis, batch_id, index, job_id, job, retention)
        try:
            await self.scheduler.send(job_id, job, lease, tier, BATCH_BAND)
        except Exception:  # its slot is back; the line is tried again next pass
            await store.drop_line_job(redis, batch_id, job_id)
            raise

    async def _finish(self, batch_id: str, record: dict, status: str) -> None:
        """Its results, in input order, as the batch's output (`/output`), and as two files:
        the answers (`output_file_id`) and the failures (`error_file_id`, if any)."""
        state, tenant, total = self.state, record["tenant_id"], int(record["total"])
        storage = state.storage
        finalizing = {"status": "finalizing", "ending": status, "finalizing_at": str(time.time())}
        await state.redis.hset(batch_key(batch_id), mapping=finalizing)

        def assemble() -> tuple[list[bytes], list[bytes]]:
            lines = [storage.get(line_key(tenant, batch_id, i)) for i in range(total)]
            storage.put(stored(tenant, batch_id, "output.jsonl"), b"\n".join(lines) + b"\n")
            succeeded = [_succeeded(json.loads(raw)) for raw in lines]  # each read once
            answered = [raw for raw, ok in zip(lines, succeeded, strict=True) if ok]
            failed = [raw for raw, ok in zip(lines, succeeded, strict=True) if not ok]
            return answered, failed

        answered, failed = await anyio.to_thread.run_sync(assemble)
        retention = int(record["retention"])
        ended = {"status": status}
        kept = await self._keep(tenant, batch_id, "output", answered, retention)
        ended["output_file_id"] = kept.id
        if failed:
            kept = await self._keep(tenant, batch_id, "error", failed, retention)
            ended["error_file_id"] = kept.id
        await anyio.to_thread.run_sync(storage.delete, stored(tenant, batch_id, "lines"))
        files = stored(tenant, batch_id)
        await store.end_batch(state.redis, batch_id, ended, files, retention, time.time())
        self._specs.pop(batch_id, None)
        log.info("batch %s %s (%d lines)", batch_id, status, total)

    async def _keep(
        self, tenant: str, batch_id: str, name: str, lines: list[bytes], retention: int
    ) -> StoredFile:
        """A file of purpose batch_output the tenant reads with /v1/files (kept as long as
        the batch, the operator's file retention at most; whatever the plan's bytes: it is
        the answer to work already done)."""
        now = datetime.now(UTC)
        made = StoredFile(
            id=stored_files.new_file_id(),
            tenant_id=uuid.UUID(tenant),
            purpose=BATCH_OUTPUT,
            filename=f"{batch_id}_{name}.jsonl",
            created_at=now,
            expires_at=stored_files.expiry(
                now, retention, self.state.settings.file_retention_seconds
            ),
        )
        made.storage_key = file_key(tenant, made.id)
        data = b"".join(line + b"\n" for line in lines)
        made.bytes = await anyio.to_thread.run_sync(self.state.storage.put, made.storage_key, data)
        await stored_files.keep_output(self.state.sessions, made)
        return made


def _failed(custom_id: str | None, code: str, message: str, job_id: str | None = None) -> dict:
    """The result line of a line that gave no answer."""
    error = {"code": code, "message": message}
    return {"id": job_id, "custom_id": custom_id, "response": None, "error": error}


def _succeeded(line: dict) -> bool:
    response = line.get("response")
    return line.get("error") is None and response is not None and response["status_code"] < 400
