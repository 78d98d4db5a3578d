"""The Celery application of a worker process, built from its settings."""

import logging
import os
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import redis
from celery import Celery, signals
from celery.exceptions import Reject

from billing.db import session_factory, sync_engine
from billing.usage_writer import UsageWriter
from config import logs, traces
from storage import Storage
from workers.contract import CHAT_TASK, IMAGES_TASK, SD_QUEUE, WorkerStatus, celery_app
from workers.settings import WorkerSettings
from workers.status import StatusPublisher
from workers.streams import Claims
from workers.tasks import WorkerRuntime, process_name, run_chat, run_images
from workers.usage_spool import UsageSpool

log = logging.getLogger(__name__)
REQUEUE_PAUSE_SECONDS = 1.0  # a job Redis failed under goes back to its queue after this


def load_engine(settings: WorkerSettings):
    if settings.queue == SD_QUEUE:
        from workers.engines.diffusion import DiffusionEngine

        return DiffusionEngine(
            settings.sd_model,
            settings.sd_weights(),
            device=settings.device,
            max_batch_images=settings.sd_max_batch_images,
            batch_window_seconds=settings.sd_batch_window_seconds,
            storage=Storage(settings.storage_url),
            cudnn_attention=settings.sd_cudnn_attention,
            warm_sizes=settings.sd_warm_sizes_parsed(),
            warm_steps=settings.sd_warm_steps,
            compiled=settings.sd_compile_wanted(),
        )
    if settings.engine == "echo":
        from workers.engines.echo import EchoEngine

        return EchoEngine(settings.llava_model)
    if settings.engine == "vllm":
        from workers.engines.llava_vllm import VllmLlava, VllmOptions

        return VllmLlava(
            settings.llava_model,
            settings.llava_weights(),
            max_output_tokens=settings.max_output_tokens,
            max_batch=settings.concurrency,
            options=VllmOptions(
                gpu_memory_utilization=settings.vllm_gpu_memory_utilization,
                max_model_len=settings.vllm_max_model_len,
                enforce_eager=settings.vllm_enforce_eager,
            ),
        )
    from workers.engines.llava_transformers import TransformersLlava

    return TransformersLlava(
        settings.llava_model,
        settings.llava_weights(),
        device=settings.device,
        max_output_tokens=settings.max_output_tokens,
        max_batch=settings.concurrency,
        keep_alive=settings.keep_alive_seconds,
        decode=settings.llava_decode,
        prefill_tokens=settings.llava_prefill_tokens,
        weights=settings.llava_weight_format,
        compile=settings.llava_compile,
    )


def create_worker_app(settings: WorkerSettings, runtime: WorkerRuntime) -> Celery:
    """A Celery app whose tasks run on `runtime` (which holds the resident model)."""
    app = celery_app("gpuhost", **settings.celery())

    @app.task(name=CHAT_TASK, shared=False, bind=True)
    def chat(task, payload: dict) -> str:
        with requeued_while_redis_is_away():
            return run_chat(runtime, payload, redelivered(task))

    @app.task(name=IMAGES_TASK, shared=False, bind=True)
    def images(task, payload: dict) -> str:
        with requeued_while_redis_is_away():
            return run_images(runtime, payload, redelivered(task))

    return app


@contextmanager
def requeued_while_redis_is_away() -> Iterator[None]:
    """A job that Redis failed under (restarting: its claim, stream or slot unreachable) goes
    back to its queue, a second later, rather than being acknowledged as done and lost. Its
    next delivery is a redelivery: if it ran to its end meanwhile, the ledger says so and it
    is not run again."""
    try:
        yield
    except redis.RedisError as exc:
        log.warning("Redis is unreachable (%s): the job goes back to its queue", exc)
        time.sleep(REQUEUE_PAUSE_SECONDS)
        raise Reject(exc, requeue=True) from exc


def redelivered(task) -> bool:
    """Whether the broker delivers this message again (kombu marks the messages it restores
    from a lost consumer, RabbitMQ its redeliveries): only then may the job already be done."""
    return bool((task.request.delivery_info or {}).get("redelivered"))


def consume(make_app: Callable[[], Celery], queue: str, concurrency: int) -> None:
    """Run a Celery consumer on the queue until asked to stop (SIGTERM / SIGINT). A consumer
    that dies of an error instead (kombu's Redis transport can, when the broker restarts while
    messages are unacknowledged: "Unrecoverable error: AttributeError ... 'hostname'") is
    started again in this process, with backoff: the model stays loaded, rather than the
    process exiting and a supervisor loading it again."""
    argv = [
        "worker",
        f"--queues={queue}",
        "--pool=threads",
        f"--concurrency={concurrency}",
        "--loglevel=INFO",
        "--without-gossip",
        "--without-mingle",
        # one node name per process: two workers of a queue on one host (compose, dev) would
        # otherwise share it, and RabbitMQ lets only one of them hold its control queue
        f"--hostname={queue}-{os.getpid()}@%h",
    ]
    if logs.LogSettings().log_format == "json":
        argv.insert(0, "--quiet")  # no banner: every line of the process is a JSON object
    # A job's line is the task's own ("job <id> completed: ... GPU-seconds", with its request
    # and tenant: config.logs); Celery's received / succeeded lines would say less, twice.
    for chatty in ("celery.worker.strategy", "celery.app.trace"):
        logging.getLogger(chatty).setLevel(logging.WARNING)
    asked = threading.Event()  # Celery's handlers of SIGTERM / SIGINT say so before stopping

    def shutting_down(**_) -> None:
        asked.set()

    signals.worker_shutting_down.connect(shutting_down, weak=False)
    pause = 1.0
    while True:
        started = time.monotonic()
        make_app().worker_main(argv)
        if asked.is_set():
            return
        if time.monotonic() - started > 60:
            pause = 1.0  # it ran a good while: not a crash loop
        log.error("the %s consumer stopped on an error; starting it again in %.0fs", queue, pause)
        time.sleep(pause)
        pause = min(30.0, pause * 2)


def weights_modified_at(settings: WorkerSettings) -> float:
    """When the weights this worker serves last changed: their files' newest mtime."""
    weights = settings.llava_weights() if settings.queue == "llava" else settings.sd_weights()
    files = [path for path in weights.rglob("*") if path.is_file()] if weights.is_dir() else []
    return max((path.stat().st_mtime for path in files), default=0.0)


def run_worker(settings: WorkerSettings) -> None:
    """Load the model once, then consume the queue with a pool of threads until SIGTERM/SIGINT."""
    traces.configure(f"gpuhost-worker-{settings.queue}")  # if an OTLP endpoint is set
    client = redis.Redis.from_url(settings.redis_url)
    sessions = session_factory(sync_engine(settings.database_url))
    runtime = WorkerRuntime(
        settings=settings,
        redis=client,
        sessions=sessions,
        engine=load_engine(settings),
        claims=Claims(
            client, process_name(), settings.claim_ttl_seconds, settings.lease_ttl_seconds
        ),
        usage_spool=UsageSpool(client, sessions, UsageWriter(sessions)),
    )
    changed = weights_modified_at(settings)
    status = StatusPublisher(
        client,
        process_name(),
        lambda: WorkerStatus(
            process=process_name(),
            queue=settings.queue,
            weights_modified_at=changed,
            capacity=settings.concurrency,
            updated_at=0.0,
            **runtime.engine.status(),
        ),
    )
    if settings.metrics_port:
        from workers.metrics import serve

        serve(settings.metrics_port, settings.queue, runtime.engine.status)
    try:
        consume(
            lambda: create_worker_app(settings, runtime),
            settings.queue,
            settings.concurrency,
        )
    finally:
        status.stop()
        runtime.usage_spool.close()  # after the pool has stopped: what it finished is committed
        runtime.claims.stop()
        runtime.engine.close()
