"""Entry point of a worker process (`gpuhost worker`)."""

from workers.celery_app import run_worker
from workers.settings import WorkerSettings


def main(queue: str, concurrency: int | None = None) -> None:
    overrides: dict = {"queue": queue}
    if concurrency is not None:
        overrides["concurrency"] = concurrency
    settings = WorkerSettings(**overrides)
    if settings.queue == "train":
        from workers.training.worker import run_train_worker

        run_train_worker(settings)
    else:
        run_worker(settings)
