"""Entry point of a worker process (`gpuhost worker`)."""

from workers.celery_app import run_worker
from workers.settings import WorkerSettings


def main(queue: str, concurrency: int | None = None) -> None:
    overrides: dict = {"queue": queue}
    if concurrency is not None:
        overrides["concurrency"] = concurrency
    run_worker(WorkerSettings(**overrides))
