"""A job's Redis side, seen from the worker: its claim, its cancel flag and its chunk stream."""

import logging
import threading
import uuid

import redis

from workers.contract import (
    LEASE_RENEW,
    AnyChunk,
    ChatJob,
    ImageJob,
    ProgressChunk,
    TokenChunk,
    cancel_key,
    claim_key,
    encode_chunk,
    slots_key,
    started_key,
    stream_key,
)

log = logging.getLogger(__name__)

# Delete the claim only if it is still ours (it may have expired and been taken since).
RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('DEL', KEYS[1])
end
return 0
"""


class Claims:
    """The claims of the jobs this worker process runs, renewed by a thread of their own.

    A claim says "this job is running here". It expires `ttl` seconds after its worker stops
    renewing it (the process died), which is how a redelivered job, or the gateway, tells a
    lost job from one that is still running or waiting for the engine.
    """

    def __init__(self, client: redis.Redis, owner: str, ttl: float, lease_ttl: float = 30.0):
        self._redis = client
        self._owner = owner
        self._ttl_ms = int(ttl * 1000)
        self._lease_ms = int(lease_ttl * 1000)
        self._held: dict[str, str] = {}  # request id -> its tenant's slots key
        self._lock = threading.Lock()
        self._release = client.register_script(RELEASE)
        self._renew_lease = client.register_script(LEASE_RENEW)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="claims", daemon=True)
        self._thread.start()

    def take(self, request_id: str, tenant_id: uuid.UUID | str | None = None) -> bool:
        """Claim the job; while it is held, its tenant's slot lease (if any) is renewed too."""
        taken = self._redis.set(claim_key(request_id), self._owner, nx=True, px=self._ttl_ms)
        if taken:
            with self._lock:
                self._held[request_id] = slots_key(tenant_id) if tenant_id else ""
        return bool(taken)

    def release(self, request_id: str) -> None:
        """The job is over: drop its claim, and give its slot back (a no-op if the gateway
        already has)."""
        with self._lock:
            slots = self._held.pop(request_id, "")
        self._release(keys=[claim_key(request_id)], args=[self._owner])
        if slots:
            self._redis.zrem(slots, request_id)

    def stop(self) -> None:
        self._stopped.set()
        self._thread.join()

    def _renew(self) -> None:
        every = min(self._ttl_ms, self._lease_ms) / 3000
        while not self._stopped.wait(every):
            with self._lock:
                held = dict(self._held)
            if not held:
                continue
            try:
                pipe = self._redis.pipeline(transaction=False)
                for request_id in held:
                    pipe.pexpire(claim_key(request_id), self._ttl_ms)
                pipe.execute()
                for request_id, slots in held.items():
                    if slots:  # only while the lease is still there: XX never re-adds one
                        self._renew_lease(keys=[slots], args=[self._lease_ms, request_id])
            except redis.RedisError as exc:
                log.warning("could not renew %d claim(s): %s", len(held), exc)


class JobChannel:
    """Publishes one job's chunks and tells the engine when the client has gone."""

    def __init__(self, client: redis.Redis, job: ChatJob | ImageJob, owner: str, retention: int):
        self._redis = client
        self._id = job.request_id
        self._owner = owner
        self._retention = retention
        self.tokens_sent = 0

    def started_before(self) -> bool:
        """True when an earlier delivery of this job began running and never finished."""
        return not self._redis.set(started_key(self._id), self._owner, nx=True, ex=self._retention)

    def cancelled(self) -> bool:
        return bool(self._redis.exists(cancel_key(self._id)))

    # -- TokenSink

    def token(self, text: str) -> None:
        self._publish(TokenChunk(text=text))
        self.tokens_sent += 1

    def should_stop(self) -> bool:
        return self.cancelled()

    # -- ProgressSink (Stable Diffusion)

    def progress(self, step: int, steps: int) -> None:
        self._publish(ProgressChunk(step=step, steps=steps))

    # -- the end of the job

    def publish_final(self, chunk: AnyChunk) -> None:
        self._publish(chunk, final=True)

    def _publish(self, chunk: AnyChunk, final: bool = False) -> None:
        key = stream_key(self._id)
        pipe = self._redis.pipeline(transaction=False)
        pipe.xadd(key, encode_chunk(chunk))
        pipe.expire(key, self._retention)
        if final:
            pipe.expire(started_key(self._id), self._retention)
        pipe.execute()
