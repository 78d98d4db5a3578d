"""Group commits for usage records.

A worker's request threads each finish with one usage record (and its outbox row) that must
be durable before the request is reported done. Committing each in its own transaction costs
one WAL flush per record, which caps a node at a few hundred records a second. `UsageWriter`
commits whatever has arrived since its last commit in one transaction: every caller still
returns only after its record is committed, as with a transaction of its own, and the records
of many requests share one flush.

A failed group is retried record by record, so one bad record (say, a tenant deleted
meanwhile) fails only its own caller. Two threads (connections) commit by turns, so that one
gathers and sends a group while PostgreSQL works on the other's.
"""

import logging
import queue
import threading
from dataclasses import dataclass, field

from sqlalchemy.orm import Session, sessionmaker

from billing.db import transaction
from billing.usage import UsageCreate, record_many

log = logging.getLogger(__name__)


@dataclass
class _Pending:
    usage: UsageCreate
    done: threading.Event = field(default_factory=threading.Event)
    written: bool = False
    error: BaseException | None = None


class WriterClosed(RuntimeError):
    pass


class UsageWriter:
    def __init__(
        self, sessions: sessionmaker[Session], max_group: int = 1000, connections: int = 2
    ):
        self._sessions = sessions
        self._max_group = max_group
        self._queue: queue.Queue[_Pending | None] = queue.Queue()
        self._closed = False
        self.commits = 0  # transactions committed (groups), for benchmarks and tests
        self._counting = threading.Lock()
        # Each thread commits its own groups on its own connection: while one waits for
        # PostgreSQL, another gathers and sends the next group.
        self._threads = [
            threading.Thread(target=self._run, name=f"usage-writer-{i}", daemon=True)
            for i in range(connections)
        ]
        for thread in self._threads:
            thread.start()

    def record(self, usage: UsageCreate) -> bool:
        """Write `usage` (and its outbox row); returns once committed. True if this call wrote
        it, False if its request id was already recorded."""
        if self._closed:
            raise WriterClosed("the usage writer is closed")
        pending = _Pending(usage)
        self._queue.put(pending)
        pending.done.wait()
        if pending.error is not None:
            raise pending.error
        return pending.written

    def close(self) -> None:
        """Commit what is queued, then stop."""
        self._closed = True
        for _ in self._threads:
            self._queue.put(None)
        for thread in self._threads:
            thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            group = [self._queue.get()]
            while len(group) < self._max_group:
                try:
                    group.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            stopping = None in group
            for _ in range(group.count(None) - 1):
                self._queue.put(None)  # another thread's stop signal: pass it on
            group = [p for p in group if p is not None]
            if group:
                self._commit(group)

    def _commit(self, group: list[_Pending]) -> None:
        try:
            with transaction(self._sessions) as session:
                results = record_many(session, [p.usage for p in group])
        except Exception as exc:
            if len(group) > 1:
                log.warning(
                    "a group of %d usage records failed; writing them one by one", len(group)
                )
                for pending in group:
                    self._commit([pending])
                return
            log.exception("usage record %s not written", group[0].usage.request_id)
            group[0].error = exc
            group[0].done.set()
            return
        with self._counting:
            self.commits += 1
        for pending, written in zip(group, results, strict=True):
            pending.written = written
            pending.done.set()
