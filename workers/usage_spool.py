"""Usage records that could not reach PostgreSQL, kept in Redis until they can.

A request that ran is recorded exactly once, whatever PostgreSQL does meanwhile. A worker
writes each record through its `UsageWriter`, retrying a few times with backoff; if the ledger
is still away, the record is parked here (a Redis hash by request id, `USAGE_PARKED`) and the
answer goes out as usual. Every worker process drains the hash every `every` seconds: what it
writes to PostgreSQL (idempotent by request id, so two drainers, or a record written twice,
still make one row) leaves the hash only once committed. A worker killed after parking a
record leaves it for any other worker to write; a worker that stops drains once more first.
"""

import json
import logging
import threading
import time
import uuid
from dataclasses import asdict
from datetime import datetime

import redis
from sqlalchemy.orm import Session, sessionmaker

from billing.db import database_away, transaction
from billing.usage import UsageCreate, record_many
from billing.usage_writer import UsageWriter
from workers.keyspace import USAGE_PARKED

log = logging.getLogger(__name__)

DRAIN_BATCH = 500


def _dump(usage: UsageCreate) -> str:
    return json.dumps(asdict(usage), default=str)


def _load(raw: bytes) -> UsageCreate:
    data = json.loads(raw)
    for name in ("started_at", "finished_at"):
        if data[name] is not None:
            data[name] = datetime.fromisoformat(data[name])
    data["tenant_id"] = uuid.UUID(data["tenant_id"])
    if data["api_key_id"] is not None:
        data["api_key_id"] = uuid.UUID(data["api_key_id"])
    return UsageCreate(**data)


class UsageSpool:
    """Writes usage records to the ledger, parking them in Redis while it is away."""

    def __init__(
        self,
        client: redis.Redis,
        sessions: sessionmaker[Session],
        writer: UsageWriter,
        retries: tuple[float, ...] = (0.2, 0.5, 1.0),
        every: float = 2.0,
    ):
        self._redis = client
        self._sessions = sessions
        self._writer = writer
        self._retries = retries
        self._every = every
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._drain_forever, name="usage-spool", daemon=True)
        self._thread.start()

    def record(self, usage: UsageCreate) -> bool:
        """Write the record (True if this call wrote it, False if its request id was already
        recorded); while the ledger stays away after the retries, park it (True)."""
        for pause in self._retries:
            try:
                return self._writer.record(usage)
            except Exception as exc:
                if not database_away(exc):
                    raise
            time.sleep(pause)
        try:
            return self._writer.record(usage)
        except Exception as exc:
            if not database_away(exc):
                raise
            log.warning(
                "the ledger is away (%s); usage of %s parked until it is back",
                type(exc).__name__,
                usage.request_id,
            )
        self._redis.hset(USAGE_PARKED, usage.request_id, _dump(usage))
        return True

    def parked(self, request_id: str) -> bool:
        """The request's record is parked, waiting for the ledger."""
        return bool(self._redis.hexists(USAGE_PARKED, request_id))

    def drain_once(self) -> int:
        """Write the parked records to the ledger, a page at a time in one transaction each;
        how many left the spool. A record the ledger refuses (not an outage) stays parked."""
        cursor, moved = 0, 0
        while True:
            cursor, found = self._redis.hscan(USAGE_PARKED, cursor, count=DRAIN_BATCH)
            if found:
                try:
                    with transaction(self._sessions) as session:
                        record_many(session, [_load(raw) for raw in found.values()])
                    written = list(found)
                except Exception as exc:
                    if database_away(exc):
                        return moved  # still away: next pass
                    written = [key for key, raw in found.items() if self._one(key, raw)]
                if written:
                    self._redis.hdel(USAGE_PARKED, *written)
                    moved += len(written)
            if cursor == 0:
                return moved

    def _one(self, request_id: bytes, raw: bytes) -> bool:
        try:
            self._writer.record(_load(raw))
        except Exception:
            log.exception("parked usage of %s refused by the ledger; kept", request_id.decode())
            return False
        return True

    def close(self) -> None:
        """Stop: one last pass over the parked records (what the ledger cannot take now stays
        parked for the other workers), then the writer commits what is queued and stops."""
        self._stopped.set()
        self._thread.join()
        try:
            self.drain_once()
        except redis.RedisError as exc:
            log.warning("could not drain parked usage on the way out: %s", exc)
        self._writer.close()

    def _drain_forever(self) -> None:
        while not self._stopped.wait(self._every):
            try:
                if moved := self.drain_once():
                    log.info("%d parked usage record(s) written to the ledger", moved)
            except redis.RedisError as exc:
                log.warning("could not read parked usage: %s", exc)
