"""Every Redis key gpuhost writes, and the Lua scripts of the tenant slot semaphore and the job
claim: the one place their names and their atomic steps are spelled, for the gateway and the
workers alike. Imports nothing but the standard library (the gateway imports it).

Celery's own keys (a queue's list is named after the queue) are Celery's, not listed here.
"""

import uuid

PREFIX = "gpuhost:"

# -- one job (a request, an async job or a batch line), by its request id ---------------------


def stream_key(request_id: str) -> str:
    """Redis Stream the worker writes the job's chunks to and the gateway reads."""
    return f"{PREFIX}job:{request_id}"


def cancel_key(request_id: str) -> str:
    """Set by the gateway when the client goes away; the worker stops at the next token."""
    return f"{PREFIX}job:{request_id}:cancel"


def done_key(request_id: str) -> str:
    """A list the worker pushes to when the job's final chunk is in its stream."""
    return f"{PREFIX}job:{request_id}:done"


def meta_key(request_id: str) -> str:
    """Whose job it is and how its stream is rendered (written with its slot, for resuming)."""
    return f"{PREFIX}job:{request_id}:meta"


def attached_key(request_id: str) -> str:
    """Refreshed by a gateway while a client reads a resumed stream."""
    return f"{PREFIX}job:{request_id}:attached"


def claim_key(request_id: str) -> str:
    """Held (with a TTL, renewed) by the worker process that runs the job."""
    return f"{PREFIX}job:{request_id}:claim"


def started_key(request_id: str) -> str:
    """Set once a worker has started the job; outlives the claim."""
    return f"{PREFIX}job:{request_id}:started"


# -- asynchronous jobs (/v1/jobs): records, queues and indexes ------------------------------

TENANTS_WAITING = f"{PREFIX}jobs:waiting-tenants"  # tenants with a job waiting for a slot
SUBMITTED = f"{PREFIX}jobs:submitted"  # enqueued, lease kept by the schedulers until started
HOOKED = f"{PREFIX}jobs:hooked"  # jobs with a webhook whose last event is not recorded yet
TAKING = f"{PREFIX}jobs:taking"  # a lock: held by the one scheduler taking waiting jobs
# job id -> tenant: taken off its queue by a scheduler and not yet placed (a slot and its next
# step); what a scheduler that failed or died half way left, the next one puts back in line
IN_HAND = f"{PREFIX}jobs:in-hand"


def job_record_key(job_id: str) -> str:
    """An async job's record (a hash: its tenant, state, spec, webhook...)."""
    return f"{PREFIX}jobs:{job_id}"


def idempotency_key(job_id: str) -> str:
    """The fingerprint of the request an Idempotency-Key made the job `job_id` for."""
    return f"{PREFIX}jobs:{job_id}:key"


def waiting_key(tenant_id: str) -> str:
    """The tenant's jobs waiting for a slot, oldest first."""
    return f"{PREFIX}jobs:waiting:{tenant_id}"


def jobs_index_key(tenant_id: str) -> str:
    """The tenant's jobs by creation time (GET /v1/jobs)."""
    return f"{PREFIX}jobs:by-tenant:{tenant_id}"


# -- batches (/v1/batches) ----------------------------------------------------------------

BATCHES_ACTIVE = f"{PREFIX}batches:active"
BATCHES_EXPIRING = f"{PREFIX}batches:expiring"  # ended batches' storage folders, by when they go


def batch_key(batch_id: str) -> str:
    return f"{PREFIX}batches:{batch_id}"


def batch_running_key(batch_id: str) -> str:
    """The batch's lines running now: line job id -> line index."""
    return f"{PREFIX}batches:{batch_id}:running"


def batch_lock_key(batch_id: str) -> str:
    """Held by the gateway advancing the batch (one at a time)."""
    return f"{PREFIX}batches:{batch_id}:lock"


def batches_index_key(tenant_id: str) -> str:
    return f"{PREFIX}batches:by-tenant:{tenant_id}"


# -- workers, images by URL, dashboard sessions --------------------------------------------

WORKER_KEY_PREFIX = f"{PREFIX}worker:"


def worker_key(process: str) -> str:
    """Where a worker process publishes its `WorkerStatus` (expires if it stops publishing)."""
    return WORKER_KEY_PREFIX + process


def image_file_key(token: str) -> str:
    """An image answered as a URL (`response_format: url`), until it expires."""
    return f"{PREFIX}file:{token}"


def credential_failures_key(address: str) -> str:
    """Failed credentials from one client address in the current window: a counter that
    expires with it (api/guards/throttle.py)."""
    return f"{PREFIX}auth-failures:address:{address}"


# A pub/sub channel: the id of each key revoked, by whatever path (the admin API, the
# dashboard, `gpuhost admin key revoke`); every gateway drops it from its caches at once.
KEYS_REVOKED = f"{PREFIX}keys:revoked"


def dashboard_session_key(token: str) -> str:
    return f"{PREFIX}dashboard:session:{token}"


# -- usage records waiting for the ledger (workers.usage_spool) -------------------------------

USAGE_PARKED = f"{PREFIX}usage:parked"  # request id -> its usage record (JSON)


# -- the tenant slot semaphore -------------------------------------------------------------
# Per tenant, a sorted set of the requests in flight scored by when their lease expires (Redis
# server time, ms, so gateway clocks do not matter). The gateway takes a slot (SLOT_ACQUIRE)
# and renews it while it relays the job (SLOT_RENEW); the worker running the job renews it too,
# so that a job whose gateway died keeps its slot until it ends, and gives it back when it
# does (JOB_RELEASE). Release is a ZREM, by either, and may be repeated.


def slots_key(tenant_id: uuid.UUID | str) -> str:
    return f"{PREFIX}slots:{tenant_id}"


# Take a slot unless the tenant's limit is reached, dropping expired leases first (a crashed
# holder's slot comes back within the TTL); if granted, write the job's metadata in the same
# step. KEYS: the tenant's slots[, metadata key]. ARGV: limit, TTL (ms), holder[, the
# metadata, its TTL (s)]. Returns {0, slots held} if refused, {1, slots held, now (ms)} if
# granted.
SLOT_ACQUIRE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local limit = tonumber(ARGV[1])
local ttl = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
local held = redis.call('ZCARD', KEYS[1])
if held >= limit then
  return {0, held}
end
redis.call('ZADD', KEYS[1], now + ttl, ARGV[3])
redis.call('PEXPIRE', KEYS[1], ttl)
if KEYS[2] then
  redis.call('SET', KEYS[2], ARGV[4], 'EX', ARGV[5])
end
return {1, held + 1, now}
"""

# A slot given back: the one way a slot ends, whoever ends it first (the worker with the
# job's final chunk, the gateway when its request ends, the fleet for a job that never
# started; the later ones are no-ops). If it was still held and a job waits for room, the
# room is handed on: the fleet's dispatchers are woken (FLEET_WAKE), so that the job starts
# now. KEYS: the tenant's slots, then each model's "order" (`workers.fleet_keys`). ARGV: the
# holder, FLEET_WAKE.
_GIVE_BACK = """
local function give_back(slots, holder, first_order, wake)
  if redis.call('ZREM', slots, holder) == 1 then
    for i = first_order, #KEYS do
      if redis.call('ZCARD', KEYS[i]) > 0 then
        redis.call('PUBLISH', wake, holder)
        return
      end
    end
  end
end
"""
SLOT_RELEASE = (
    _GIVE_BACK
    + """
give_back(KEYS[1], ARGV[1], 2, ARGV[2])
return 0
"""
)


# Extend a lease that is still there (XX never re-adds an expired one). KEYS: the tenant's
# slots. ARGV: TTL (ms), holder. Returns 1 if renewed, 0 if it had expired.
SLOT_RENEW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local ttl = tonumber(ARGV[1])
if redis.call('ZADD', KEYS[1], 'XX', 'CH', now + ttl, ARGV[2]) == 1 then
  redis.call('PEXPIRE', KEYS[1], ttl)
  return 1
end
return 0
"""

# -- the job claim (workers) ----------------------------------------------------------------

# Claim a job, in one round trip: take its claim unless someone holds it (-1); mark it started
# unless an earlier delivery did (that delivery died); say whether it was cancelled, and
# whether its stream holds anything (a delivery that died before its first chunk answered
# nothing: the job runs again; one that died mid-answer cannot be resumed).
# KEYS: claim, started, cancel, stream. ARGV: worker process, claim TTL (ms), retention (s).
# Returns -1, or bits: 1 started before, 2 cancelled, 4 chunks already sent.
JOB_TAKE = """
if not redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return -1
end
local fresh = redis.call('SET', KEYS[2], ARGV[1], 'NX', 'EX', ARGV[3])
local cancelled = redis.call('EXISTS', KEYS[3])
local answered = redis.call('EXISTS', KEYS[4])
return (fresh and 0 or 1) + 2 * cancelled + 4 * answered
"""

# A lapsed claim set again (a Redis restart can let it expire between two renewals), unless
# someone else has taken it meanwhile: a lapsed claim would read as a lost worker.
# KEYS: the claim. ARGV: worker process, claim TTL (ms). Returns 1 if set.
CLAIM_KEEP = """
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return 0
end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""

# The job is over, at its worker: its claim dropped if it is still ours (it may have expired
# and been taken since), its slot given back as SLOT_RELEASE gives it (a no-op if the final
# chunk or the gateway already has). KEYS: the job's claim, its tenant's slots (or the
# claim again: a job of no tenant), then each model's "order". ARGV: the process, the request
# id, FLEET_WAKE.
JOB_RELEASE = (
    _GIVE_BACK
    + """
if redis.call('GET', KEYS[1]) == ARGV[1] then
  redis.call('DEL', KEYS[1])
end
if KEYS[2] ~= KEYS[1] then
  give_back(KEYS[2], ARGV[2], 3, ARGV[3])
end
return 0
"""
)

# An async job's state moves on only from the state the mover expects (waiting -> submitted by
# a scheduler, waiting -> cancelled by a cancel): whichever comes first wins, the other sees so.
# KEYS: the job's record. ARGV: from, to. Returns 1 if moved.
JOB_MOVE = """
if redis.call('HGET', KEYS[1], 'state') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', ARGV[2])
  return 1
end
return 0
"""

# The next waiting job of a tenant, taken off its queue; a tenant whose queue is empty leaves
# the set of tenants with jobs waiting. One step, so that a job put back meanwhile (its
# tenant added again with it: WAITING_REQUEUE) never finds its tenant gone.
# The job taken is noted in IN_HAND in the same step.
# KEYS: the tenant's queue, TENANTS_WAITING, IN_HAND. ARGV: the tenant. Returns the job id or nil.
WAITING_POP = """
local job = redis.call('LPOP', KEYS[1])
if not job then
  redis.call('SREM', KEYS[2], ARGV[1])
else
  redis.call('HSET', KEYS[3], job, ARGV[1])
end
return job
"""

# How many of a tenant's requests and jobs wait: its queue, and any of its jobs a scheduler
# has taken off it to place (IN_HAND) and not yet put back (one put back and not yet let go
# of is in both: counted once). KEYS: the tenant's queue, IN_HAND. ARGV: the tenant.
WAITING_COUNT = """
local n = redis.call('LLEN', KEYS[1])
local held = redis.call('HGETALL', KEYS[2])
for i = 1, #held, 2 do
  if held[i + 1] == ARGV[1] and not redis.call('LPOS', KEYS[1], held[i]) then
    n = n + 1
  end
end
return n
"""

# A waiting synchronous request is granted its slot only while it still waits: its record
# moves to granted with the slot's grant time in one step, and a record its request deleted
# (it left) is not made again. KEYS: the record. ARGV: waiting, granted, the grant time (ms).
# Returns 1 if granted.
JOB_GRANT = """
if redis.call('HGET', KEYS[1], 'state') == ARGV[1] then
  redis.call('HSET', KEYS[1], 'state', ARGV[2], 'granted_ms', ARGV[3])
  return 1
end
return 0
"""

# A job taken off its queue goes back first in line, its tenant among those with jobs
# waiting, only if it still waits: one that left meanwhile (a request whose client went away,
# a cancelled job) is not put back. KEYS: the job's record, the tenant's queue,
# TENANTS_WAITING. ARGV: waiting, the job id, the tenant. Returns 1 if put back.
WAITING_REQUEUE = """
if redis.call('HGET', KEYS[1], 'state') ~= ARGV[1] then
  return 0
end
redis.call('LPUSH', KEYS[2], ARGV[2])
redis.call('SADD', KEYS[3], ARGV[3])
return 1
"""
