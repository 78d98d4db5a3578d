"""A worker's heartbeat: its `WorkerStatus`, published to Redis on a thread of its own."""

import logging
import threading
import time

import redis

from workers.contract import WorkerStatus
from workers.keyspace import worker_key

log = logging.getLogger(__name__)


class StatusPublisher:
    def __init__(self, client: redis.Redis, process: str, describe, every: float = 0.5):
        """`describe()` returns the current `WorkerStatus` (without `updated_at`)."""
        self._redis = client
        self._key = worker_key(process)
        self._describe = describe
        self._every = every
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="status", daemon=True)
        self._thread.start()

    def publish(self) -> None:
        status: WorkerStatus = self._describe()
        status.updated_at = time.time()
        ttl = max(5, int(self._every * 10))
        self._redis.set(self._key, status.model_dump_json(), ex=ttl)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()
        try:
            self._redis.delete(self._key)
        except redis.RedisError as exc:  # it expires by itself
            log.warning("could not withdraw the worker status: %s", exc)

    def _run(self) -> None:
        while not self._stopped.wait(self._every):
            try:
                self.publish()
            except redis.RedisError as exc:
                log.warning("could not publish the worker status: %s", exc)
