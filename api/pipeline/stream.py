"""The one reader of a job's chunk stream (`workers.streams.JobChannel` writes it).

`JobStream.follow` hands the chunks over one by one (streamed answers, resumed streams),
`JobStream.settled` in one read once the final one is there (answers that are not streamed),
`JobStream.snapshot` reads what is there now (async job views). Following, it watches what can
go wrong meanwhile: the worker that took the job died (its claim expired), no worker took the
job, the model went silent, the client left, the job's stream expired.
"""

import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import redis.asyncio as aioredis
from redis.exceptions import RedisError

from api.errors import BadRequest, GatewayTimeout, Unavailable
from api.settings import GatewaySettings
from workers.contract import WORKER_LOST, AnyChunk, decode_chunk, is_final
from workers.keyspace import (
    attached_key,
    cancel_key,
    claim_key,
    done_key,
    meta_key,
    started_key,
    stream_key,
)

POLL_MS = 500
ATTACHED_TTL_SECONDS = 3

# A relay rides out a Redis restart this long before its client gets an error.
REDIS_WAIT_SECONDS = 10.0

Chunk = AnyChunk
Disconnected = Callable[[], Awaitable[bool]]


class RedisOutage:
    """Redis failing under a relay: it is tried again every half second until it answers, for
    up to REDIS_WAIT_SECONDS since it first failed; then the client gets a 503."""

    def __init__(self) -> None:
        self._since: float | None = None

    async def wait(self, exc: RedisError) -> None:
        now = time.monotonic()
        if self._since is None:
            self._since = now
        if now - self._since >= REDIS_WAIT_SECONDS:
            raise Unavailable(f"lost the connection to the job stream ({exc})") from exc
        await anyio.sleep(0.5)

    def over(self) -> None:
        self._since = None


class JobStream:
    """One job's chunks, read in order from where this reader left off."""

    def __init__(self, redis: aioredis.Redis, request_id: str, settings: GatewaySettings):
        self.redis = redis
        self.request_id = request_id
        self.settings = settings
        self.ended = False  # its final chunk was read, or the job was cancelled or given up
        self._key = stream_key(request_id)
        self._last_id = "0-0"  # the last chunk read
        self.first_chunk_ms: int | None = None  # when the first chunk was written (Redis time)
        # since when its worker has been found lost before answering (awaiting redelivery)
        self._unanswered_since: float | None = None

    async def seek(self, after: int) -> None:
        """Read on from the chunk at index `after` (400 if fewer have been sent)."""
        if after <= 0:
            return
        seen = await self.redis.xrange(self._key, count=after)
        if len(seen) < after:
            raise BadRequest(f"after={after}: the job has sent only {len(seen)} chunks so far")
        self._last_id = seen[-1][0].decode()

    async def follow(
        self, disconnected: Disconnected | None = None, attached: bool = False
    ) -> AsyncIterator[Chunk]:
        """The chunks, in order, until the final one. `disconnected`, if given, is asked about
        twice a second: when it says True the job is cancelled and iteration ends. `attached`:
        a client reads this resumed stream (the job's abandoned relay keeps it alive)."""
        heard_at = asked_at = time.monotonic()
        outage = RedisOutage()
        while not self.ended:
            try:
                if attached:
                    await self.redis.set(
                        attached_key(self.request_id), "1", ex=ATTACHED_TTL_SECONDS
                    )
                reply = await self.redis.xread({self._key: self._last_id}, count=64, block=POLL_MS)
                if not reply and await self._gone():
                    # Its last words may have landed just before its claim went: read once more.
                    reply = await self.redis.xread({self._key: self._last_id}, count=64)
                    if not reply:
                        raise await self._given_up_as_lost()
            except RedisError as exc:
                await outage.wait(exc)
                continue
            outage.over()
            now = time.monotonic()
            if disconnected is not None and now - asked_at >= POLL_MS / 1000:
                asked_at = now
                if await disconnected():
                    await self.cancel()
                    return
            if not reply:
                await self._check_silence(now - heard_at)
                continue
            heard_at = now
            for entry_id, fields in reply[0][1]:
                yield self._accept(entry_id, fields)
                if self.ended:
                    return

    async def settled(self, disconnected: Disconnected | None = None) -> AsyncIterator[Chunk]:
        """The remaining chunks, read in one go once the final one is there: for an answer that
        is not streamed, one wait and one read, where `follow` reads once per token or
        progress step. The worker signals the final chunk on a list of its own
        (`workers.streams.JobChannel.publish_final`); twice a second meanwhile this watches
        what `follow` watches."""
        signal = done_key(self.request_id)
        heard_at, length = time.monotonic(), -1
        outage = RedisOutage()
        while not self.ended:
            try:
                signalled = await self.redis.blpop([signal], timeout=POLL_MS / 1000)
                if signalled or await self._gone():
                    after = "-" if self._last_id == "0-0" else f"({self._last_id}"
                    entries = await self.redis.xrange(self._key, min=after)
                    if not signalled and not any(is_final(decode_chunk(f)) for _, f in entries):
                        raise await self._given_up_as_lost()
                else:
                    if disconnected is not None and await disconnected():
                        await self.cancel()
                        return
                    now, seen = time.monotonic(), await self.redis.xlen(self._key)
                    if seen != length:
                        heard_at, length = now, seen
                    await self._check_silence(now - heard_at)
                    continue
            except RedisError as exc:
                await outage.wait(exc)
                continue
            outage.over()
            for entry_id, fields in entries:
                yield self._accept(entry_id, fields)
                if self.ended:
                    return

    async def snapshot(self) -> list[tuple[float, Chunk]]:
        """Every chunk sent so far, with the unix time each was written."""
        return [
            (int(entry_id.split(b"-")[0]) / 1000, decode_chunk(fields))
            for entry_id, fields in await self.redis.xrange(self._key)
        ]

    async def started(self) -> bool:
        """A worker has started the job."""
        return bool(await self.redis.exists(started_key(self.request_id)))

    async def cancel(self) -> None:
        """Ask the worker to stop (or never to start) this job; this reader reads no more."""
        self.ended = True
        ttl = int(self.settings.idle_timeout_seconds) + 600
        await self.redis.set(cancel_key(self.request_id), "1", ex=ttl)

    def _accept(self, entry_id, fields) -> Chunk:
        entry_id = entry_id.decode() if isinstance(entry_id, bytes) else entry_id
        if self._last_id == "0-0":
            self.first_chunk_ms = int(entry_id.partition("-")[0])
        self._last_id = entry_id
        chunk = decode_chunk(fields)
        if is_final(chunk):
            self.ended = True
        return chunk

    async def _gone(self) -> bool:
        """The worker that started the job died (its claim expired) after it began to answer;
        or it died before its first chunk and the job was not delivered again (to another
        worker, or the same one restarted) within the broker's visibility timeout and the
        queue timeout: until then the client only waits. Or the job itself is gone (its
        retention passed: 504). One round trip."""
        pipe = self.redis.pipeline(transaction=False)
        pipe.exists(started_key(self.request_id))
        pipe.exists(claim_key(self.request_id))
        pipe.exists(meta_key(self.request_id))
        pipe.exists(self._key)
        started, claimed, known, answered = await pipe.execute()
        if not known:
            self.ended = True
            raise GatewayTimeout("the job's stream expired")
        if not started or claimed:
            self._unanswered_since = None
            return False
        if answered:
            return True
        now = time.monotonic()
        if self._unanswered_since is None:
            self._unanswered_since = now
        settings = self.settings
        patience = settings.visibility_timeout_seconds + settings.queue_timeout_seconds
        return now - self._unanswered_since > patience

    async def _given_up_as_lost(self) -> Unavailable:
        """Its worker died: the job is cancelled (a redelivery records it unbilled)."""
        await self.cancel()
        return Unavailable(WORKER_LOST)

    async def _check_silence(self, silent_for: float) -> None:
        settings = self.settings
        if self._last_id != "0-0":
            if silent_for > settings.idle_timeout_seconds:
                await self.cancel()
                raise GatewayTimeout(
                    f"the model sent nothing for {settings.idle_timeout_seconds:.0f}s; "
                    "request cancelled"
                )
            return
        if silent_for > settings.queue_timeout_seconds and not await self.started():
            await self.cancel()
            raise Unavailable(
                f"no worker took the request within {settings.queue_timeout_seconds:.0f}s; "
                "the service is overloaded or no worker is running"
            )
