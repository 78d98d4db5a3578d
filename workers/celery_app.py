"""The Celery application of a worker process, built from its settings."""

import redis
from celery import Celery

from billing.db import session_factory, sync_engine
from billing.usage_writer import UsageWriter
from storage import Storage
from workers.contract import CHAT_TASK, IMAGES_TASK, SD_QUEUE, WorkerStatus, celery_config
from workers.settings import WorkerSettings
from workers.status import StatusPublisher
from workers.streams import Claims
from workers.tasks import WorkerRuntime, owner, run_chat, run_images


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
    )


def create_worker_app(settings: WorkerSettings, runtime: WorkerRuntime) -> Celery:
    """A Celery app whose tasks run on `runtime` (which holds the resident model)."""
    app = Celery("gpuhost")
    app.conf.update(celery_config(**settings.celery()))

    @app.task(name=CHAT_TASK)
    def chat(payload: dict) -> str:
        return run_chat(runtime, payload)

    @app.task(name=IMAGES_TASK)
    def images(payload: dict) -> str:
        return run_images(runtime, payload)

    return app


def run_worker(settings: WorkerSettings) -> None:
    """Load the model once, then consume the queue with a pool of threads until SIGTERM/SIGINT."""
    client = redis.Redis.from_url(settings.redis_url)
    sessions = session_factory(sync_engine(settings.database_url))
    runtime = WorkerRuntime(
        settings=settings,
        redis=client,
        sessions=sessions,
        engine=load_engine(settings),
        claims=Claims(client, owner(), settings.claim_ttl_seconds, settings.lease_ttl_seconds),
        ledger=UsageWriter(sessions),
    )
    status = StatusPublisher(
        client,
        owner(),
        lambda: WorkerStatus(
            owner=owner(), queue=settings.queue, updated_at=0.0, **runtime.engine.status()
        ),
    )
    if settings.metrics_port:
        from workers.metrics import serve

        serve(settings.metrics_port, settings.queue, runtime.engine.status)
    app = create_worker_app(settings, runtime)
    try:
        app.worker_main(
            [
                "worker",
                f"--queues={settings.queue}",
                "--pool=threads",
                f"--concurrency={settings.concurrency}",
                "--loglevel=INFO",
                "--without-gossip",
                "--without-mingle",
                f"--hostname={settings.queue}@%h",
            ]
        )
    finally:
        status.stop()
        runtime.ledger.close()  # after the pool has stopped: what it finished is committed
        runtime.claims.stop()
        runtime.engine.close()
