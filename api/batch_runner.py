"""The batches' side of every gateway's job scheduler (api/job_scheduler.py): starts a batch's
lines when nothing else waits, collects their results, writes the batch's output when its last
line ends, and deletes ended batches' files when their retention is over."""

import contextlib
import json
import logging
import time

import anyio
from cachetools import LRUCache
from redis.exceptions import LockError

from api import async_jobs
from api.batches import ACTIVE, ENDED, EXPIRING, batch_key, line_key, running_key, stored
from api.errors import TooManyRequests
from api.state import AppState
from workers.contract import cancel_key

log = logging.getLogger(__name__)

SWEEP_EVERY = 1.0
LOCK_SECONDS = 30  # a gateway that died advancing a batch holds it up at most this long
SPECS_CACHED = 8  # batches whose lines a gateway keeps in memory


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
            key = stored(tenant, batch_id, "specs.jsonl")
            data = await anyio.to_thread.run_sync(self.state.storage.get, key)
            self._specs[batch_id] = [json.loads(line) for line in data.splitlines()]
        return self._specs[batch_id]

    async def _result(self, batch_id: str, tenant: str, index: int, line: dict, ok: bool) -> None:
        storage = self.state.storage
        data = json.dumps(line).encode()
        await anyio.to_thread.run_sync(storage.put, line_key(tenant, batch_id, index), data)
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
            lines = [storage.get(line_key(tenant, batch_id, i)) for i in range(total)]
            storage.put(stored(tenant, batch_id, "output.jsonl"), b"\n".join(lines) + b"\n")
            storage.delete(stored(tenant, batch_id, "lines"))

        await anyio.to_thread.run_sync(assemble)
        retention = int(record["retention"])
        pipe = self.state.redis.pipeline(transaction=True)
        pipe.hset(batch_key(batch_id), mapping={"status": status, "finished_at": str(time.time())})
        pipe.expire(batch_key(batch_id), retention)
        pipe.srem(ACTIVE, batch_id)
        pipe.zadd(EXPIRING, {stored(tenant, batch_id): time.time() + retention})
        await pipe.execute()
        self._specs.pop(batch_id, None)
        log.info("batch %s %s (%d lines)", batch_id, status, total)
