"""The tasks: run one job on the resident engine, stream it, meter it, record it once.

Both families (LLaVA chat, Stable Diffusion images) share the scaffolding in `_run`: a job
already recorded or running elsewhere is a duplicate delivery and is ignored; a job whose
earlier delivery died mid-run is recorded as failed (not billed); a job cancelled before it
started is recorded as cancelled; otherwise the engine runs it, the usage record is written,
and then the final chunk is published (so a client that sees it can find the record).
"""

import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from sqlalchemy.orm import Session, sessionmaker

from billing import usage
from config import logs, traces
from workers import choices
from workers.contract import (
    CANCELLED,
    COMPLETED,
    FAILED,
    REJECTED,
    WORKER_LOST,
    AnyChunk,
    ChatJob,
    DoneChunk,
    ErrorChunk,
    ImageJob,
    ImagesChunk,
)
from workers.engines.base import InvalidRequest
from workers.settings import WorkerSettings
from workers.streams import Claims, JobChannel
from workers.usage_spool import UsageSpool

log = logging.getLogger(__name__)


def process_name() -> str:
    """This worker process, as claims and statuses name it: its host and process id."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerRuntime:
    """What a worker process keeps for its lifetime: the engine stays resident here."""

    settings: WorkerSettings
    redis: redis.Redis
    sessions: sessionmaker[Session]
    engine: object  # a ChatEngine (llava queue) or a DiffusionEngine (sd queue)
    claims: Claims
    usage_spool: UsageSpool  # usage records: group-committed, parked while the ledger is away


@dataclass(frozen=True)
class Outcome:
    """How a run ended: what goes in the usage record, and the final chunk for the client."""

    status: str
    final: AnyChunk
    gpu_seconds: float = 0.0
    prompt_tokens: int = 0
    output_tokens: int = 0


def _record(
    runtime: WorkerRuntime,
    job: ChatJob | ImageJob,
    outcome: Outcome,
    started: datetime | None,
    queue_seconds: float,
) -> None:
    written = runtime.usage_spool.record(
        usage.UsageCreate(
            request_id=job.request_id,
            tenant_id=job.tenant_id,
            api_key_id=job.api_key_id,
            model=job.model,
            kind=job.kind,
            status=outcome.status,
            gpu_seconds=outcome.gpu_seconds,
            queue_seconds=queue_seconds,
            prompt_tokens=outcome.prompt_tokens,
            output_tokens=outcome.output_tokens,
            started_at=started,
            finished_at=datetime.now(UTC),
            trace_id=traces.trace_id(),
        )
    )
    if not written:
        log.warning("usage for %s was already recorded; kept the first record", job.request_id)


def _run(
    runtime: WorkerRuntime,
    job: ChatJob | ImageJob,
    execute: Callable[[JobChannel, float], Outcome],
    cancelled_early: Callable[[float], AnyChunk],
    redelivered: bool,
) -> str:
    """Run a delivered job, in a span that continues its request's trace (the gateway's
    `enqueue` span its parent: config/traces.py)."""
    about = {"request_id": job.request_id, "tenant_id": job.tenant_id, "model": job.model}
    continued = traces.span("job", job.trace, traces.CONSUMER, redelivered=redelivered, **about)
    with continued as current:
        status = _run_once(runtime, job, execute, cancelled_early, redelivered)
        current.set_attribute("status", status)
        return status


def _run_once(
    runtime: WorkerRuntime,
    job: ChatJob | ImageJob,
    execute: Callable[[JobChannel, float], Outcome],
    cancelled_early: Callable[[float], AnyChunk],
    redelivered: bool,
) -> str:
    # A job runs once: a delivery after its record was written is a duplicate. The ledger is
    # asked only when that can be so (the broker says it delivers the job again, or an earlier
    # delivery marked it started), not on every job.
    if redelivered and _recorded(runtime, job):
        return "duplicate"
    logs.bind(request_id=job.request_id, tenant_id=job.tenant_id, model=job.model)
    retention = runtime.settings.stream_retention_seconds
    start = runtime.claims.take(job.request_id, job.tenant_id, retention)
    if start is None and redelivered:
        start = _claim_when_free(runtime, job, retention)
    if start is None:
        log.info("job %s is running on another worker; this delivery ignored", job.request_id)
        return "duplicate"
    channel = JobChannel(runtime.redis, job, retention)
    try:
        if start.started_before and not redelivered and _recorded(runtime, job):
            return "duplicate"
        queue_seconds = max(0.0, time.time() - job.enqueued_at)
        started = datetime.now(UTC)
        if start.started_before and start.answered_before:
            # An earlier delivery died mid-answer (worker lost): the client has part of an
            # answer that cannot be resumed. The platform's fault: unbilled.
            outcome = Outcome(FAILED, ErrorChunk(status=503, message=WORKER_LOST))
        elif start.cancelled:
            outcome, started = Outcome(CANCELLED, cancelled_early(queue_seconds)), None
        else:
            if start.started_before:  # it died before answering: this delivery answers
                log.info("job %s: its worker was lost before answering; running it", job.request_id)
            with traces.span("run", queue_seconds=round(queue_seconds, 3)) as running:
                outcome = _attempt(job, channel, queue_seconds, execute)
                running.set_attribute("gpu_seconds", outcome.gpu_seconds)
        with traces.span("usage.write", status=outcome.status):
            _record(runtime, job, outcome, started, queue_seconds)
        channel.publish_final(outcome.final)
        log.info(
            "job %s %s: %.3f GPU-seconds, waited %.3f s",
            job.request_id,
            outcome.status,
            outcome.gpu_seconds,
            queue_seconds,
        )
        return outcome.status
    finally:
        runtime.claims.release(job.request_id)
        logs.bind(request_id=None, tenant_id=None, model=None)  # the next job says its own


def _claim_when_free(runtime: WorkerRuntime, job: ChatJob | ImageJob, retention: int):
    """A job delivered again while another process holds its claim: that process still runs
    it (the broker lost its acknowledgement, a restart say) and renews the claim, or it died
    with it and the claim lapses within its TTL. RabbitMQ delivers a dead consumer's jobs
    again at once, before that, so wait a TTL and a half: the job is this delivery's once its
    claim is free and it was not recorded meanwhile (None: it is not)."""
    deadline = time.monotonic() + runtime.settings.claim_ttl_seconds * 1.5
    while time.monotonic() < deadline:
        time.sleep(0.2)
        if _recorded(runtime, job):
            return None
        start = runtime.claims.take(job.request_id, job.tenant_id, retention)
        if start is None:
            continue
        if _recorded(runtime, job):  # it ended between the two looks
            runtime.claims.release(job.request_id)
            return None
        return start
    return None


def _recorded(runtime: WorkerRuntime, job: ChatJob | ImageJob) -> bool:
    """The job ran to its end before: its record is in the ledger, or parked for it."""
    if runtime.usage_spool.parked(job.request_id):
        log.info(
            "job %s delivered again after it finished (record parked); ignored", job.request_id
        )
        return True
    with runtime.sessions() as session:
        if usage.exists(session, job.request_id):
            log.info("job %s delivered again after it finished; ignored", job.request_id)
            return True
    return False


def _attempt(job, channel: JobChannel, queue_seconds: float, execute) -> Outcome:
    try:
        return execute(channel, queue_seconds)
    except InvalidRequest as exc:
        return Outcome(REJECTED, ErrorChunk(status=400, message=str(exc)))
    except Exception:
        log.exception("job %s failed", job.request_id)
        message = "the model failed while running this request; it was not billed"
        return Outcome(FAILED, ErrorChunk(status=500, message=message))


# -- LLaVA chat ----------------------------------------------------------------------------------


def run_chat(runtime: WorkerRuntime, payload: dict, redelivered: bool) -> str:
    """Run one chat job. Returns the status it ended with (for logs and tests)."""
    job = ChatJob.model_validate(payload)
    if not runtime.settings.honour_keep_alive:
        job.keep_alive_seconds = None

    def execute(channel: JobChannel, queue_seconds: float) -> Outcome:
        generation = choices.generate(runtime.engine, job, channel)
        spent = usage.billed_seconds(generation.gpu_seconds)
        final = DoneChunk(
            done_reason=generation.done_reason,
            choices=list(generation.choices) or None,
            context=list(generation.context) if generation.context is not None else None,
            prompt_tokens=generation.prompt_tokens,
            output_tokens=generation.output_tokens,
            load_seconds=generation.load_seconds,
            prompt_eval_seconds=generation.prompt_eval_seconds,
            eval_seconds=generation.eval_seconds,
            queue_seconds=queue_seconds,
            gpu_seconds=spent,
        )
        status = CANCELLED if generation.done_reason == "cancelled" else COMPLETED
        return Outcome(status, final, spent, generation.prompt_tokens, generation.output_tokens)

    def cancelled_early(queue_seconds: float) -> DoneChunk:
        return DoneChunk(
            done_reason="cancelled",
            prompt_tokens=0,
            output_tokens=0,
            load_seconds=0.0,
            prompt_eval_seconds=0.0,
            eval_seconds=0.0,
            queue_seconds=queue_seconds,
            gpu_seconds=0.0,
        )

    return _run(runtime, job, execute, cancelled_early, redelivered)


# -- Stable Diffusion ----------------------------------------------------------------------------


def run_images(runtime: WorkerRuntime, payload: dict, redelivered: bool) -> str:
    """Run one image job. Returns the status it ended with."""
    job = ImageJob.model_validate(payload)

    def execute(channel: JobChannel, queue_seconds: float) -> Outcome:
        rendering = runtime.engine.render(job, channel)
        spent = usage.billed_seconds(rendering.gpu_seconds)
        final = ImagesChunk(
            images=rendering.images,
            seed=job.seed,
            load_seconds=0.0,
            run_seconds=rendering.run_seconds,
            queue_seconds=queue_seconds,
            gpu_seconds=spent,
            batch_images=rendering.batch_images,
        )
        status = CANCELLED if rendering.cancelled else COMPLETED
        return Outcome(status, final, spent, 0, len(rendering.images))

    def cancelled_early(_: float) -> ErrorChunk:
        return ErrorChunk(status=499, message="the request was cancelled before it started")

    return _run(runtime, job, execute, cancelled_early, redelivered)
