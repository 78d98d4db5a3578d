"""A job's Redis side, seen from the worker: its claim, its cancel flag and its chunk stream."""

import time

import redis

from workers.contract import (
    ChatJob,
    DoneChunk,
    ErrorChunk,
    TokenChunk,
    cancel_key,
    claim_key,
    encode_chunk,
    started_key,
    stream_key,
)

RENEW_EVERY_SECONDS = 5.0


class JobChannel:
    """Publishes one job's chunks and tells the engine when the client has gone."""

    def __init__(
        self, client: redis.Redis, job: ChatJob, owner: str, claim_ttl: int, retention: int
    ):
        self._redis = client
        self._id = job.request_id
        self._owner = owner
        self._claim_ttl = claim_ttl
        self._retention = retention
        self._renewed = 0.0
        self.tokens_sent = 0

    # -- claim: one worker runs a job at a time, and a redelivery after a crash is recognised

    def claim(self) -> bool:
        """Take the job unless another worker holds it. Renewed while the job runs."""
        taken = self._redis.set(claim_key(self._id), self._owner, nx=True, ex=self._claim_ttl)
        self._renewed = time.monotonic()
        return bool(taken)

    def started_before(self) -> bool:
        """True when an earlier delivery of this job began running and never finished."""
        return not self._redis.set(started_key(self._id), self._owner, nx=True, ex=self._retention)

    def release(self) -> None:
        self._redis.delete(claim_key(self._id))

    def _renew(self) -> None:
        now = time.monotonic()
        if now - self._renewed >= RENEW_EVERY_SECONDS:
            self._redis.expire(claim_key(self._id), self._claim_ttl)
            self._renewed = now

    # -- TokenSink

    def token(self, text: str) -> None:
        self._publish(TokenChunk(text=text))
        self.tokens_sent += 1

    def should_stop(self) -> bool:
        self._renew()
        return bool(self._redis.exists(cancel_key(self._id)))

    # -- the end of the job

    def done(self, chunk: DoneChunk) -> None:
        self._publish(chunk, final=True)

    def error(self, status: int, message: str) -> None:
        self._publish(ErrorChunk(status=status, message=message), final=True)

    def _publish(self, chunk: TokenChunk | DoneChunk | ErrorChunk, final: bool = False) -> None:
        key = stream_key(self._id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(key, encode_chunk(chunk))
        pipe.expire(key, self._retention)
        if final:
            pipe.expire(started_key(self._id), self._retention)
        pipe.execute()
