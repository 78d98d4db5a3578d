"""The train worker (`gpuhost worker --queue train`): one resident trainer, one job at a time.

A job is taken in PostgreSQL (queued -> running, first taker wins), so a duplicate delivery
does nothing. Each step is reported (step, loss, heartbeat; the answer says whether to stop);
each checkpoint is written to storage and then kept, with the segment of steps it bills, in
one transaction. A worker that stops reporting for `train_stale_seconds` is presumed lost:
any train worker's sweep queues its job again, and the next run resumes from the last
checkpoint (the steps after it are redone, and billed once, in the redone segment). A job
still queued `train_stale_seconds` after it was sent, while a worker sat idle, lost its
message in the broker: that worker sends it again.
"""

import logging
import threading
from dataclasses import dataclass, field

from celery import Celery
from sqlalchemy.orm import Session, sessionmaker

from billing import usage
from billing.db import session_factory, sync_engine, transaction
from storage import Storage, tenant_key
from tuning import dataset
from tuning import service as tuning
from tuning.models import CANCELLED, FAILED, RUNNING, SUCCEEDED, Adapter, FineTune
from tuning.params import TrainParams
from workers.celery_app import consume
from workers.contract import TRAIN_QUEUE, TRAIN_TASK, celery_app, send_training
from workers.settings import WorkerSettings
from workers.tasks import process_name
from workers.training.trainer import Checkpoint, Hooks, Trainer

log = logging.getLogger(__name__)


class Superseded(Exception):
    """Another worker took this job (this one was presumed lost)."""


@dataclass
class TrainRuntime:
    settings: WorkerSettings
    sessions: sessionmaker[Session]
    storage: Storage
    trainer: Trainer
    celery: Celery
    training: threading.Event = field(default_factory=threading.Event)  # a job runs here now


class _Hooks(Hooks):
    def __init__(self, runtime: TrainRuntime, job_id: str, tenant_id, worker: str):
        self.runtime, self.job_id, self.tenant_id, self.worker = runtime, job_id, tenant_id, worker

    def step(self, step: int, loss: float) -> bool:
        with transaction(self.runtime.sessions) as session:
            return tuning.progress(session, self.job_id, self.worker, step, loss)

    def checkpoint(self, checkpoint: Checkpoint, from_step: int, gpu_seconds: float, loss: float):
        storage = self.runtime.storage
        key = tenant_key(
            self.tenant_id, "fine_tunes", self.job_id, f"checkpoint-{checkpoint.step}.pt"
        )
        storage.put(key, checkpoint.state)
        with transaction(self.runtime.sessions) as session:
            job = session.get(FineTune, self.job_id, with_for_update=True)
            if job.worker != self.worker or job.status != RUNNING:
                storage.delete(key)
                raise Superseded(self.job_id)
            previous = job.checkpoint_key
            tuning.keep_checkpoint(
                session,
                job,
                key=key,
                from_step=from_step,
                to_step=checkpoint.step,
                gpu_seconds=usage.billed_seconds(gpu_seconds),  # to the millisecond, as billed
                loss=loss,
            )
        if previous and previous != key:
            storage.delete(previous)


def _clean_up(storage: Storage, tenant_id, job_id: str, dataset_key: str) -> None:
    """A job that has ended keeps only its adapter: its checkpoints and dataset go."""
    storage.delete(tenant_key(tenant_id, "fine_tunes", job_id))
    storage.delete(dataset_key)


def run_training(runtime: TrainRuntime, payload: dict) -> str:
    """Run (or resume) one fine-tune. Returns how it ended (for logs and tests)."""
    job_id, worker = payload["fine_tune_id"], process_name()
    with transaction(runtime.sessions) as session:
        job = tuning.take(session, job_id, worker)
        if job is None:
            log.info("fine-tune %s is not queued (done, cancelled or running); skipped", job_id)
            return "skipped"
        tenant_id, model, params = job.tenant_id, job.model, TrainParams(**job.params)
        dataset_key, checkpoint_key = job.dataset_key, job.checkpoint_key
        checkpoint_step = job.checkpoint_step
    log.info("fine-tune %s: step %d of %d", job_id, checkpoint_step, params.steps)
    storage = runtime.storage
    try:
        if model != runtime.trainer.model_name:
            raise ValueError(f"this worker trains '{runtime.trainer.model_name}', not '{model}'")
        data = storage.get(dataset_key)
        examples = dataset.examples_of(data)  # checked at the gateway
        items = dataset.load(data, examples, params.resolution or runtime.trainer.native_resolution)
        resume = (
            Checkpoint(checkpoint_step, storage.get(checkpoint_key)) if checkpoint_key else None
        )
        result = runtime.trainer.train(
            params, items, resume, _Hooks(runtime, job_id, tenant_id, worker)
        )
    except Superseded:
        log.warning("fine-tune %s was taken by another worker; this run stopped", job_id)
        return "superseded"
    except Exception as exc:
        log.exception("fine-tune %s failed", job_id)
        with transaction(runtime.sessions) as session:
            job = session.get(FineTune, job_id, with_for_update=True)
            ours = job.worker == worker and job.status == RUNNING
            if ours:
                tuning.finish(session, job, FAILED, error=f"training failed: {exc}")
        if ours:
            _clean_up(storage, tenant_id, job_id, dataset_key)
        return FAILED
    adapter_key = None
    if result.adapter is not None:
        adapter_id = tuning.new_id("lora")
        adapter_key = tenant_key(tenant_id, "adapters", f"{adapter_id}.safetensors")
        storage.put(adapter_key, result.adapter)
    try:
        with transaction(runtime.sessions) as session:
            job = session.get(FineTune, job_id, with_for_update=True)
            if job.worker != worker or job.status != RUNNING:
                raise Superseded(job_id)
            if adapter_key is None:
                status, adapter = CANCELLED, None
            else:
                status = SUCCEEDED
                adapter = Adapter(
                    id=adapter_id,
                    tenant_id=tenant_id,
                    fine_tune_id=job_id,
                    model=model,
                    key=adapter_key,
                    size_bytes=len(result.adapter),
                    rank=params.rank,
                )
            tuning.finish(session, job, status, adapter=adapter)
    except BaseException:
        if adapter_key:
            storage.delete(adapter_key)  # no row points at it
        raise
    _clean_up(storage, tenant_id, job_id, dataset_key)
    log.info("fine-tune %s %s after %d steps", job_id, status, result.steps)
    return status


class Sweeper:
    """Queues again the jobs of train workers that stopped reporting, and, while this worker
    is idle, queued jobs whose message the broker lost (every worker sweeps; the UPDATE that
    picks a job does so once)."""

    def __init__(self, runtime: TrainRuntime):
        self.runtime = runtime
        self.interval = max(0.5, runtime.settings.train_stale_seconds / 4)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="train-sweeper", daemon=True)
        self._thread.start()

    def sweep(self) -> list[str]:
        stale = self.runtime.settings.train_stale_seconds
        with transaction(self.runtime.sessions) as session:
            lost = tuning.orphans(session, stale)
        for job_id in lost:
            log.warning("fine-tune %s lost its worker; queued again to resume", job_id)
        if not self.runtime.training.is_set():
            # Idle, this worker would have been given any queued job's message by now.
            with transaction(self.runtime.sessions) as session:
                unsent = tuning.unclaimed(session, stale)
            for job_id in unsent:
                log.warning("fine-tune %s waited unclaimed (its message lost): sent again", job_id)
            lost += unsent
        for job_id in lost:
            send_training(self.runtime.celery, job_id)
        return lost

    def _run(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.sweep()
            except Exception:
                log.exception("train sweep failed")

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()


def run_train_worker(settings: WorkerSettings) -> None:
    producer = celery_app("gpuhost", **settings.celery())  # the sweep's: queues lost jobs again
    runtime = TrainRuntime(
        settings=settings,
        sessions=session_factory(sync_engine(settings.database_url)),
        storage=Storage(settings.storage_url),
        trainer=Trainer(settings.sd_model, settings.sd_weights(), device=settings.device),
        celery=producer,
    )

    def make_app() -> Celery:
        app = celery_app("gpuhost", **settings.celery())

        @app.task(name=TRAIN_TASK, shared=False)
        def train(payload: dict) -> str:
            runtime.training.set()
            try:
                return run_training(runtime, payload)
            finally:
                runtime.training.clear()

        return app

    if settings.metrics_port:  # also the pod's probe: it opens once the model is loaded
        from workers.metrics import serve

        serve(settings.metrics_port, TRAIN_QUEUE, runtime.trainer.status)
    sweeper = Sweeper(runtime)
    try:
        consume(make_app, TRAIN_QUEUE, concurrency=1)  # one training at a time per device
    finally:
        sweeper.stop()
