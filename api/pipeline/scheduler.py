"""The job schedulers: every gateway runs one. Each pass takes waiting jobs into slots, one
per tenant in turn (fair across tenants); keeps the slot leases of jobs enqueued but not yet
started; records webhook events as jobs start and end; then runs the parts given to it
(batches, whose lines start only when no job waits)."""

import asyncio
import contextlib
import json
import logging
import time
import uuid
from datetime import UTC, datetime

from kombu.exceptions import KombuError
from redis.exceptions import LockError, RedisError

from api.access.admission import Lease
from api.errors import PaymentRequired, TooManyRequests
from api.pipeline import store
from api.pipeline.submit import enqueue, take_slot
from api.pipeline.view import job_view
from api.state import AppState
from billing.db import async_transaction
from webhooks import service as webhooks
from workers.contract import ChatJob, ImageJob, send_job
from workers.keyspace import (
    HOOKED,
    SUBMITTED,
    TAKING,
    claim_key,
    done_key,
    job_record_key,
    started_key,
    stream_key,
)

log = logging.getLogger(__name__)
SCHEDULE_EVERY = 0.1
MAX_ROUNDS = 32  # of taking waiting jobs, in one pass
TAKING_SECONDS = 15  # the most one scheduler's taking may hold the others off, if it hangs


def meta(record: dict) -> store.JobMeta:
    """An async job's metadata, from its record: its stream reads as OpenAI's or /api/images'.
    A waiting synchronous request's is in its record as its gateway wrote it."""
    if record["type"] == store.SYNC:
        return store.JobMeta(**json.loads(record["meta"]))
    family = "images" if record["type"] == "images" else "openai-chat"
    tools = tuple(json.loads(record.get("tools") or "[]"))
    created = float(record["created_at"])
    return store.JobMeta(record["tenant_id"], family, record["model"], created, tools)


class Scheduler:
    """Takes waiting jobs into slots, one per tenant in turn, on every gateway."""

    def __init__(self, state: AppState, then=()):
        """`then`: makers of (state, scheduler) -> a part with `pass_once`, run after the
        waiting jobs in each pass (api.pipeline.batch_runner.BatchRunner)."""
        self.state = state
        self._renewed_at = 0.0  # leases need renewing a few times per TTL, not every pass
        self._observed_at = 0.0
        self.then = [make(state, self) for make in then]

    async def run(self) -> None:
        while True:
            await self.pass_once()
            self.state.metrics.scheduler_passes.inc()
            await asyncio.sleep(SCHEDULE_EVERY)

    async def pass_once(self) -> None:
        """Each step on its own: one that fails (Redis away, a bad record) is logged and the
        others still run, so that no one job or batch can stop every tenant's."""
        steps = [
            self._keep_submitted_leases,
            self._take_waiting,
            self._observe_webhooks,
            *(part.pass_once for part in self.then),
        ]
        for step in steps:
            try:
                await step()
            except RedisError as exc:
                log.warning("job scheduler, %s: %s", step.__name__, exc)
            except Exception:
                log.exception("job scheduler, %s failed", step.__name__)

    async def _take_waiting(self) -> None:
        """Rounds over the tenants' queues, one waiting job or request of each tenant a round,
        until a round takes none (a tenant with several slots free gets them in one pass).
        One scheduler takes at a time, so that a job taken off its queue and put back (no
        slot free) is never put back behind one that came after it."""
        taking = self.state.redis.lock(TAKING, timeout=TAKING_SECONDS, blocking=False)
        if not await taking.acquire():
            return  # another gateway's scheduler is taking them in this pass
        try:
            if put_back := await store.put_back_in_hand(self.state.redis):
                log.warning("%d job(s) a scheduler took and never placed: back in line", put_back)
            for _ in range(MAX_ROUNDS):
                if not await self._take_round():
                    return
        finally:
            with contextlib.suppress(LockError):
                await taking.release()

    async def _take_round(self) -> int:
        taken = 0
        for tenant, job_id in await store.next_waiting(self.state.redis):
            taken += await self._place(tenant, job_id)
            await store.placed(self.state.redis, job_id)
        return taken

    async def _place(self, tenant: str, job_id: str) -> int:
        """A slot for a job taken off its queue, and its next step: 1 if it got one."""
        redis = self.state.redis
        record = await store.job_record(redis, job_id)
        if record.get("state") != store.WAITING:
            return 0  # cancelled or expired meanwhile
        try:  # the tenant's tier and allowance now, not as they were when it was submitted
            tier = await self._current_tier(record)
        except PaymentRequired as refused:
            await self._refuse(tenant, job_id, record, refused)
            return 0
        try:
            lease = await take_slot(self.state, tenant, tier, job_id, meta(record))
        except TooManyRequests:
            await store.requeue(redis, tenant, job_id)  # its turn comes again
            return 0
        except Exception:  # Redis away: the job stays first in line, if it can be put back
            await store.requeue(redis, tenant, job_id)
            raise
        if record["type"] == store.SYNC:  # its own gateway sends it
            if not await store.grant(redis, job_id, lease.granted_ms):
                await self.state.admission.release(lease)  # it left while it was taken
            return 1
        if not await store.move_job(redis, job_id, store.WAITING, store.SUBMITTED_STATE):
            await self.state.admission.release(lease)  # cancelled while it was taken
            return 1
        try:
            await self.send(job_id, record, lease, tier)
        except Exception:  # not enqueued (its slot is back): first in line again
            await store.unsubmit(redis, job_id, tenant)
            raise
        return 1

    async def send(
        self, job_id: str, record: dict, lease: Lease, tier: str, band: int | None = None
    ) -> None:
        """Offer a job that holds its slot (a waiting job or a batch line) to the fleet, in
        its tenant's current plan's band (`band`: a batch line's); the schedulers keep its
        lease whenever no worker holds it, until it has answered."""
        images = record["type"] == "images"
        spec = (ImageJob if images else ChatJob).model_validate_json(record["spec"])
        spec.enqueued_at = time.time()
        await store.keep_lease(self.state.redis, job_id, record["tenant_id"], spec.enqueued_at)
        band = self.state.settings.plans[tier].band if band is None else band
        await enqueue(self.state, lease, spec, tier, band, recorded=True)

    async def _current_tier(self, record: dict) -> str:
        """The tier of the job's tenant now (PaymentRequired if its allowance is spent): a
        job waiting since before a change of plan starts on the plan as it is."""
        if record["type"] == store.SYNC:  # its gateway checked it as it came
            return record["tier"]
        return (await self.state.quotas.check(uuid.UUID(record["tenant_id"]), fresh=True)).tier

    async def _refuse(self, tenant: str, job_id: str, record: dict, refused) -> None:
        """A waiting async job its tenant's plan no longer covers: it ends as the request
        would have at the door (402), never run, never billed."""
        redis = self.state.redis
        if await store.move_job(redis, job_id, store.WAITING, store.SUBMITTED_STATE):
            spec = (ImageJob if record["type"] == "images" else ChatJob).model_validate_json(
                record["spec"]
            )
            await self.state.fleet.end_unstarted(
                str(spec.tenant_id), spec.request_id, refused.status, refused.message
            )

    async def _keep_submitted_leases(self) -> None:
        """Renew the slot of each job enqueued whose worker does not hold it, three times per
        lease TTL: before a worker takes it, and after a worker that took it was lost before
        answering, while the job waits to be delivered again. A worker running it renews the
        slot itself; once the job has answered, its slot is no longer the schedulers' care."""
        now = time.monotonic()
        if now - self._renewed_at < self.state.settings.lease_ttl_seconds / 3:
            return
        self._renewed_at = now
        redis = self.state.redis
        submitted = [
            (raw_id.decode(), raw_tenant.decode())
            for raw_id, raw_tenant in (await redis.hgetall(SUBMITTED)).items()
        ]
        pipe = redis.pipeline(transaction=False)
        for job_id, _ in submitted:
            pipe.exists(job_record_key(job_id))
            pipe.exists(stream_key(job_id))
            pipe.exists(claim_key(job_id))
        found = await pipe.execute()
        waiting = []
        for index, (job_id, tenant) in enumerate(submitted):
            known, answered, claimed = found[3 * index : 3 * index + 3]
            if answered or not known:
                await redis.hdel(SUBMITTED, job_id)
            elif not claimed:
                waiting.append(Lease(tenant, job_id))
        if waiting:
            await self.state.admission.renew_all(waiting)
            await self._send_again_if_lost(waiting)

    async def _send_again_if_lost(self, waiting: list[Lease]) -> None:
        """A job enqueued over GPUHOST_QUEUE_TIMEOUT_SECONDS ago that no worker holds lost its
        message (a broker that restarted before it was on disk, a delivery that failed and was
        acknowledged): send it again. Should the first message turn up after all, its worker
        finds the job claimed or recorded and does not run it twice."""
        redis = self.state.redis
        pipe = redis.pipeline(transaction=False)
        for lease in waiting:
            pipe.hmget(job_record_key(lease.holder), "sent_at", "type", "spec")
        timeout = self.state.settings.queue_timeout_seconds
        for _, (at, kind, spec) in zip(waiting, await pipe.execute(), strict=True):
            if at is None or spec is None or time.time() - float(at) < timeout:
                continue
            job = (ImageJob if kind == b"images" else ChatJob).model_validate_json(spec)
            job.enqueued_at = time.time()
            log.warning("job %s was not started within %.0f s: sent again", job.request_id, timeout)
            await redis.hset(job_record_key(job.request_id), "sent_at", str(time.time()))
            try:
                await asyncio.to_thread(send_job, self.state.celery, job)
            except (KombuError, OSError) as exc:  # the broker is away: the next pass tries
                log.warning("job %s could not be sent again: %s", job.request_id, exc)

    async def _observe_webhooks(self) -> None:
        """Record the events of jobs with webhooks as they happen (the sender delivers them);
        a job leaves the watch once its last event is recorded."""
        now = time.monotonic()
        if now - self._observed_at < self.state.settings.webhook_poll_seconds:
            return
        self._observed_at = now
        for raw in await self.state.redis.smembers(HOOKED):
            job_id = raw.decode()
            try:
                await self._observe_job(job_id)
            except Exception:  # its events wait for the next pass; the others go on
                log.exception("webhook events of job %s could not be recorded", job_id)

    async def _observe_job(self, job_id: str) -> None:
        """Record the job's events that have happened since the last pass. Whether one has is
        told by two keys (the job's started mark, and the signal its worker gives with the
        final chunk) or its cancellation: the job's view (its whole stream) is read, and the
        ledger written, only when there is an event to record."""
        redis = self.state.redis
        record = await store.job_record(redis, job_id)
        if not record:
            await redis.srem(HOOKED, job_id)  # expired
            return
        recorded = set(filter(None, record.get("webhook_recorded", "").split(",")))
        pending = [e for e in record["webhook_events"].split(",") if e not in recorded]
        pipe = redis.pipeline(transaction=False)
        pipe.exists(started_key(job_id))
        pipe.exists(done_key(job_id))
        started, ended = await pipe.execute()
        ended = bool(ended) or record["state"] == store.CANCELLED
        due = [
            event
            for event, happened in (("start", bool(started)), ("completed", ended))
            if happened and event in pending
        ]
        if due:
            view = await job_view(self.state, job_id, record["tenant_id"])
            async with async_transaction(self.state.sessions) as session:
                for event in due:
                    payload = {
                        "type": f"job.{event}",
                        "timestamp": datetime.now(UTC).isoformat(),
                        "data": view,
                    }
                    tenant = uuid.UUID(record["tenant_id"])
                    url = record["webhook_url"]
                    await webhooks.record(session, tenant, job_id, event, url, payload)
            recorded |= set(due)
            await redis.hset(job_record_key(job_id), "webhook_recorded", ",".join(sorted(recorded)))
        if ended:
            await redis.srem(HOOKED, job_id)
