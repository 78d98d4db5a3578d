"""A job's Redis side, seen from the worker: its claim, its cancel flag and its chunk stream."""

import logging
import threading
import time
import uuid
from dataclasses import dataclass

import redis

from workers.contract import (
    QUEUES,
    AnyChunk,
    ChatJob,
    ImageJob,
    ProgressChunk,
    TokenChunk,
    TokenLogprob,
    encode_chunk,
)
from workers.fleet_keys import FLEET_WAKE, fleet_waiting_keys
from workers.keyspace import (
    CLAIM_KEEP,
    JOB_RELEASE,
    JOB_TAKE,
    SLOT_RELEASE,
    SLOT_RENEW,
    cancel_key,
    claim_key,
    done_key,
    slots_key,
    started_key,
    stream_key,
)

log = logging.getLogger(__name__)
WAITING_KEYS = fleet_waiting_keys(QUEUES)
REDIS_WAIT_SECONDS = 10.0  # a chunk waits this long for Redis (restarting) to come back
# ... and a final chunk this long: its job is recorded, its client must hear how it ended
FINAL_WAIT_SECONDS = 30.0


@dataclass(frozen=True)
class Start:
    """What a worker found when it claimed a job."""

    started_before: bool  # an earlier delivery began running it and never finished
    cancelled: bool  # the client cancelled it before it started
    answered_before: bool = False  # that earlier delivery sent chunks before it died


class Claims:
    """The claims of the jobs this worker process runs, renewed by a thread of their own.

    A claim says "this job is running here". It expires `ttl` seconds after its worker stops
    renewing it (the process died), which is how a redelivered job, or the gateway, tells a
    lost job from one that is still running or waiting for the engine.
    """

    def __init__(self, client: redis.Redis, process: str, ttl: float, lease_ttl: float = 30.0):
        self._redis = client
        self._process = process
        self._ttl_ms = int(ttl * 1000)
        self._lease_ms = int(lease_ttl * 1000)
        self._held: dict[str, str] = {}  # request id -> its tenant's slots key
        self._lock = threading.Lock()
        self._take = client.register_script(JOB_TAKE)
        self._release = client.register_script(JOB_RELEASE)
        self._renew_lease = client.register_script(SLOT_RENEW)
        self._keep = client.register_script(CLAIM_KEEP)
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._renew, name="claims", daemon=True)
        self._thread.start()

    def take(
        self, request_id: str, tenant_id: uuid.UUID | str | None, retention: int
    ) -> Start | None:
        """Claim the job and mark it started (None: another worker holds it). While the claim
        is held, its tenant's slot lease (if any) is renewed too."""
        keys = [
            claim_key(request_id),
            started_key(request_id),
            cancel_key(request_id),
            stream_key(request_id),
        ]
        found = self._take(keys=keys, args=[self._process, self._ttl_ms, retention])
        if found < 0:
            return None
        with self._lock:
            self._held[request_id] = slots_key(tenant_id) if tenant_id else ""
        return Start(
            started_before=bool(found & 1),
            cancelled=bool(found & 2),
            answered_before=bool(found & 4),
        )

    def release(self, request_id: str) -> None:
        """The job is over: drop its claim, and give its slot back (a no-op if the gateway
        already has)."""
        with self._lock:
            slots = self._held.pop(request_id, "")
        keys = [claim_key(request_id), slots or claim_key(request_id), *WAITING_KEYS]
        self._release(keys=keys, args=[self._process, request_id, FLEET_WAKE])

    def _restore(self, request_id: str) -> None:
        """Set a lapsed claim again while the job is still held here and no one else has
        taken it: a lapsed claim reads as a lost worker, to the gateway and to a redelivery."""
        with self._lock:
            if request_id in self._held:
                self._keep(keys=[claim_key(request_id)], args=[self._process, self._ttl_ms])
                log.warning("the claim of %s had lapsed; set again", request_id)

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
                kept = pipe.execute()
                for request_id, renewed in zip(held, kept, strict=True):
                    if not renewed:  # lapsed (a Redis restart between two renewals)
                        self._restore(request_id)
                for request_id, slots in held.items():
                    if slots:  # only while the lease is still there: XX never re-adds one
                        self._renew_lease(keys=[slots], args=[self._lease_ms, request_id])
            except redis.RedisError as exc:
                log.warning("could not renew %d claim(s): %s", len(held), exc)


class JobChannel:
    """Publishes one job's chunks and tells the engine when the client has gone."""

    def __init__(self, client: redis.Redis, job: ChatJob | ImageJob, retention: int):
        self._redis = client
        self._id = job.request_id
        self._slots = slots_key(job.tenant_id)
        self._give_back = client.register_script(SLOT_RELEASE)
        self._retention = retention
        self._expiry_set_at = float("-inf")  # when the stream's expiry was last pushed back
        self.tokens_sent = 0

    def cancelled(self) -> bool:
        """Whether the job was cancelled; Redis away (restarting) reads as not: the job runs
        on, and its chunks wait for Redis (`_publish`)."""
        try:
            return bool(self._redis.exists(cancel_key(self._id)))
        except redis.RedisError:
            return False

    # -- TokenSink

    def token(
        self, text: str, logprobs: list[TokenLogprob] | None = None, choice: int | None = None
    ) -> None:
        self._publish(TokenChunk(text=text, logprobs=logprobs, choice=choice))
        self.tokens_sent += 1

    def should_stop(self) -> bool:
        return self.cancelled()

    # -- ProgressSink (Stable Diffusion)

    def progress(self, step: int, steps: int) -> None:
        self._publish(ProgressChunk(step=step, steps=steps))

    # -- the end of the job

    def publish_final(self, chunk: AnyChunk) -> None:
        """The job's last chunk. Its tenant's slot is given back first, in the same round
        trip, so that the slot is free before anyone reads the chunk (the gateway, which would
        otherwise give it back itself, does not). Redis away is waited for up to
        FINAL_WAIT_SECONDS; past that the error goes up, the job goes back to its queue, and
        its next delivery finds it recorded."""
        self._publish(chunk, final=True, wait=FINAL_WAIT_SECONDS)

    def _publish(
        self, chunk: AnyChunk, final: bool = False, wait: float = REDIS_WAIT_SECONDS
    ) -> None:
        """Append the chunk; Redis away (restarting) is waited for, up to `wait` seconds,
        before the error goes up (for a token: the engine fails the job, unbilled)."""
        deadline = time.monotonic() + wait
        while True:
            try:
                return self._append(chunk, final)
            except redis.RedisError as exc:
                if time.monotonic() >= deadline:
                    raise
                log.warning("could not publish to %s (%s); trying again", self._id, exc)
                time.sleep(0.5)

    def _append(self, chunk: AnyChunk, final: bool) -> None:
        """Append the chunk. The stream's expiry is set with its first chunk and its last, and
        in between only every quarter of the retention time (XADD keeps a key's expiry), so a
        token costs one command."""
        key = stream_key(self._id)
        now = time.monotonic()
        if not final and now - self._expiry_set_at < self._retention / 4:
            self._redis.xadd(key, encode_chunk(chunk))
            return
        self._expiry_set_at = now
        pipe = self._redis.pipeline(transaction=False)
        if final:  # the slot first, and the fleet woken to hand its room on
            keys = [self._slots, *WAITING_KEYS]
            self._give_back(keys=keys, args=[self._id, FLEET_WAKE], client=pipe)
        pipe.xadd(key, encode_chunk(chunk))
        pipe.expire(key, self._retention)
        if final:
            pipe.expire(started_key(self._id), self._retention)
            pipe.rpush(done_key(self._id), "1")  # after the chunk: a gateway waits on it
            pipe.expire(done_key(self._id), self._retention)
        pipe.execute()
