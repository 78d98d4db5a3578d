"""The LLaVA chat task: run one job on the resident engine, stream it, meter it, record it."""

import logging
import os
import socket
import time
from dataclasses import dataclass
from datetime import UTC, datetime

import redis
from sqlalchemy.orm import Session, sessionmaker

from billing import usage
from billing.db import transaction
from workers.contract import (
    CANCELLED,
    COMPLETED,
    FAILED,
    REJECTED,
    ChatJob,
    DoneChunk,
)
from workers.engines.base import ChatEngine, Generation, InvalidRequest
from workers.settings import WorkerSettings
from workers.streams import Claims, JobChannel

log = logging.getLogger(__name__)


def owner() -> str:
    """Who runs a job: this host and process."""
    return f"{socket.gethostname()}:{os.getpid()}"


@dataclass
class WorkerRuntime:
    """What a worker process keeps for its lifetime: the engine stays resident here."""

    settings: WorkerSettings
    redis: redis.Redis
    sessions: sessionmaker[Session]
    engine: ChatEngine
    claims: Claims


def _record(
    runtime: WorkerRuntime,
    job: ChatJob,
    status: str,
    started: datetime | None,
    queue_seconds: float,
    generation: Generation | None = None,
) -> None:
    with transaction(runtime.sessions) as session:
        written = usage.record(
            session,
            usage.UsageCreate(
                request_id=job.request_id,
                tenant_id=job.tenant_id,
                api_key_id=job.api_key_id,
                model=job.model,
                kind=job.kind,
                status=status,
                gpu_seconds=generation.gpu_seconds if generation else 0.0,
                queue_seconds=queue_seconds,
                prompt_tokens=generation.prompt_tokens if generation else 0,
                output_tokens=generation.output_tokens if generation else 0,
                started_at=started,
                finished_at=datetime.now(UTC),
            ),
        )
    if not written:
        log.warning("usage for %s was already recorded; kept the first record", job.request_id)


def _nothing_done(queue_seconds: float) -> DoneChunk:
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


def run_chat(runtime: WorkerRuntime, payload: dict) -> str:
    """Run one chat job. Returns the status it ended with (for logs and tests)."""
    job = ChatJob.model_validate(payload)
    settings = runtime.settings
    if not settings.honour_keep_alive:
        job.keep_alive_seconds = None
    with runtime.sessions() as session:
        if usage.exists(session, job.request_id):
            log.info("job %s delivered again after it finished; ignored", job.request_id)
            return "duplicate"
    if not runtime.claims.take(job.request_id):
        log.info("job %s is running on another worker; this delivery ignored", job.request_id)
        return "duplicate"
    channel = JobChannel(runtime.redis, job, owner(), settings.stream_retention_seconds)
    try:
        return _run_claimed(runtime, job, channel)
    finally:
        runtime.claims.release(job.request_id)


def _run_claimed(runtime: WorkerRuntime, job: ChatJob, channel: JobChannel) -> str:
    queue_seconds = max(0.0, time.time() - job.enqueued_at)
    started = datetime.now(UTC)
    if channel.started_before():
        # An earlier delivery died mid-request (worker lost). The platform's fault: not billed.
        _record(runtime, job, FAILED, started, queue_seconds)
        channel.error(503, "the worker running this request was lost; please retry")
        return FAILED
    if channel.cancelled():
        _record(runtime, job, CANCELLED, None, queue_seconds)
        channel.done(_nothing_done(queue_seconds))
        return CANCELLED
    try:
        generation = runtime.engine.generate(job, channel)
    except InvalidRequest as exc:
        _record(runtime, job, REJECTED, started, queue_seconds)
        channel.error(400, str(exc))
        return REJECTED
    except Exception:
        log.exception("job %s failed", job.request_id)
        _record(runtime, job, FAILED, started, queue_seconds)
        channel.error(500, "the model failed while running this request; it was not billed")
        return FAILED
    status = CANCELLED if generation.done_reason == "cancelled" else COMPLETED
    _record(runtime, job, status, started, queue_seconds, generation)
    channel.done(
        DoneChunk(
            done_reason=generation.done_reason,
            prompt_tokens=generation.prompt_tokens,
            output_tokens=generation.output_tokens,
            load_seconds=generation.load_seconds,
            prompt_eval_seconds=generation.prompt_eval_seconds,
            eval_seconds=generation.eval_seconds,
            queue_seconds=queue_seconds,
            gpu_seconds=generation.gpu_seconds,
        )
    )
    return status
