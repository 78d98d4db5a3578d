"""Hand a job to the workers and relay what they stream back, holding the tenant's slot."""

import asyncio
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
from kombu.exceptions import KombuError
from redis.exceptions import RedisError

from api.admission import Lease
from api.errors import GatewayTimeout, Unavailable
from api.state import AppState
from workers.contract import (
    CHAT_TASK,
    LLAVA_QUEUE,
    ChatJob,
    DoneChunk,
    ErrorChunk,
    TokenChunk,
    cancel_key,
    claim_key,
    decode_chunk,
    started_key,
    stream_key,
)

log = logging.getLogger(__name__)

POLL_MS = 500
Chunk = TokenChunk | DoneChunk | ErrorChunk


class Job:
    """One admitted request: its slot, its task, and the stream of its chunks."""

    def __init__(self, state: AppState, job: ChatJob, lease: Lease):
        self.state = state
        self.job = job
        self.lease = lease
        self.finished = False
        self._last_id = "0-0"
        self._released = False
        # The lease is renewed on its own clock, not the client's: a slow reader keeps its slot.
        self._renewal = asyncio.create_task(self._keep_lease())

    async def _keep_lease(self) -> None:
        every = self.state.settings.lease_ttl_seconds / 3
        while True:
            await asyncio.sleep(every)
            try:
                if not await self.state.admission.renew(self.lease):
                    log.warning(
                        "the lease of %s had expired before it was renewed", self.request_id
                    )
            except RedisError as exc:
                log.warning("could not renew the lease of %s: %s", self.request_id, exc)

    @property
    def request_id(self) -> str:
        return self.job.request_id

    async def enqueue(self) -> None:
        def send() -> None:
            self.state.celery.send_task(
                CHAT_TASK,
                args=[self.job.model_dump(mode="json")],
                task_id=self.request_id,
                queue=LLAVA_QUEUE,
            )

        try:
            await anyio.to_thread.run_sync(send)
        except (KombuError, OSError) as exc:
            raise Unavailable(f"the job queue is unavailable ({exc}); try again shortly") from exc

    async def chunks(
        self, disconnected: Callable[[], Awaitable[bool]] | None = None
    ) -> AsyncIterator[Chunk]:
        """The job's chunks, in order, until its final one. Keeps the slot's lease alive.

        `disconnected`, if given, is polled while waiting; when it says True the job is
        cancelled and iteration ends.
        """
        key = stream_key(self.request_id)
        waited_since = time.monotonic()
        while not self.finished:
            try:
                reply = await self.state.redis.xread({key: self._last_id}, count=64, block=POLL_MS)
                if not reply and await self._worker_lost():
                    # Its last words may have landed just before its claim went: read once more.
                    reply = await self.state.redis.xread({key: self._last_id}, count=64)
                    if not reply:
                        await self.cancel()
                        raise Unavailable(
                            "the worker running this request was lost; it was not billed, "
                            "please retry"
                        )
                if not reply:
                    await self._check_waiting(time.monotonic() - waited_since)
                    if disconnected is not None and await disconnected():
                        await self.cancel()
                        return
                    continue
            except RedisError as exc:
                raise Unavailable(f"lost the connection to the job stream ({exc})") from exc
            waited_since = time.monotonic()
            for entry_id, fields in reply[0][1]:
                self._last_id = entry_id
                chunk = decode_chunk(fields)
                if not isinstance(chunk, TokenChunk):
                    # The work is over: the slot is free before the client hears so.
                    self.finished = True
                    await self.close()
                yield chunk
                if self.finished:
                    return

    async def _worker_lost(self) -> bool:
        """A worker started the job, and its claim has expired: the worker died."""
        started = await self.state.redis.exists(started_key(self.request_id))
        return bool(started) and not await self.state.redis.exists(claim_key(self.request_id))

    async def _check_waiting(self, silent_for: float) -> None:
        settings = self.state.settings
        if self._last_id != "0-0":
            if silent_for > settings.idle_timeout_seconds:
                await self.cancel()
                raise GatewayTimeout(
                    f"the model sent nothing for {settings.idle_timeout_seconds:.0f}s; "
                    "request cancelled"
                )
            return
        if silent_for > settings.queue_timeout_seconds and not await self.state.redis.exists(
            started_key(self.request_id)
        ):
            await self.cancel()
            raise Unavailable(
                f"no worker took the request within {settings.queue_timeout_seconds:.0f}s; "
                "the service is overloaded or no worker is running"
            )

    async def cancel(self) -> None:
        """Ask the worker to stop (or never to start) this job."""
        self.finished = True
        await self.state.redis.set(
            cancel_key(self.request_id), "1", ex=int(self.state.settings.idle_timeout_seconds) + 600
        )

    async def close(self) -> None:
        """Free the slot; if the job has not finished, cancel it first. Safe to repeat."""
        if self._released:
            return
        self._released = True
        self._renewal.cancel()
        with anyio.CancelScope(shield=True):
            try:
                if not self.finished:
                    await self.cancel()
                await self.state.admission.release(self.lease)
            except RedisError:
                # The lease expires by itself within its TTL; nothing more can be done now.
                log.warning(
                    "could not release the slot of %s; it expires with its lease", self.request_id
                )
