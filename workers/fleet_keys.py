"""The fleet's keys and scripts in Redis (api/pipeline/fleet.py hands admitted jobs to the
workers when one has room): torch-free, shared with the workers (a slot given back wakes the
fleet's dispatchers). The rest of the keyspace: `workers.keyspace`."""

from workers.keyspace import PREFIX

# -- the fleet: admitted jobs handed to the workers when one has room (api/pipeline/fleet.py) --
# Per model queue: the workers' capacity (their request threads, from their statuses), the jobs
# handed to the broker and not yet ended ("running", member "tenant/job", scored by when), and
# the jobs admitted and waiting for room ("ready": an entry each, a spec each; "order": by band,
# then arrival, scored `fleet_order`; "aging": those that age, every one but batch lines, by
# arrival); per tenant, the GPU-seconds it was recently served, and what a job of its usually
# costs.


def fleet_key(queue: str, part: str) -> str:
    """capacity, running, ready, order, aging, served or cost of `queue`'s fleet."""
    return f"{PREFIX}fleet:{queue}:{part}"


ORDER_SPAN = 2**42  # milliseconds (139 years of unix time): a band's span of "order" scores


def fleet_order(band: int, arrived_ms: int) -> int:
    """A ready job's score in "order": by band, then arrival (exact in a double for every band
    below 2,048)."""
    return band * ORDER_SPAN + arrived_ms


def fleet_spec_key(job_id: str) -> str:
    """A ready job's spec (the Celery message to send), until it is sent."""
    return f"{PREFIX}fleet:spec:{job_id}"


FLEET_LOCK = f"{PREFIX}fleet:dispatching"  # held by the one scheduler handing jobs out
# A channel: a slot given back, or a job kept ready, publishes its id here; every gateway's
# dispatcher listens, so that a job waiting for room starts as soon as there is some.
FLEET_WAKE = f"{PREFIX}fleet:wake"

# The room a job may take: all of the capacity, or, for a job that leaves `reserved` slots to
# the paying plans, all but those (all of it where the capacity is no more than that). Used by
# both scripts below; KEYS[1] is the capacity, ARGV[1] the job's reserve.
_FLEET_ROOM = """
local capacity = tonumber(redis.call('GET', KEYS[1]) or '-1')
local reserved = tonumber(ARGV[1])
local limit = capacity
if capacity > reserved then
  limit = capacity - reserved
end
"""

# Hand a job that holds its slot to a worker now, if the workers have room for it and no job
# waits that would go before it (one of its band or a lower one, or one past the aging bound);
# else keep it ready, and wake the dispatchers. KEYS: capacity, running, order, ready, aging,
# spec. ARGV: the job's reserve, the running member ("tenant/job"), now (ms), job id, its
# ready entry (JSON), its spec (JSON), the spec's TTL (s), FLEET_WAKE, its "order" score, the
# first score of the band after its own, whether it ages (1/0), the aging bound's cutoff
# (ms). Returns 0 (send it now: it counts as running) or its place among the ready jobs (1:
# next) by band, then arrival.
FLEET_OFFER = (
    _FLEET_ROOM
    + """
local running = redis.call('ZCARD', KEYS[2])
if capacity < 0 or (
  running < limit
  and redis.call('ZCOUNT', KEYS[3], '-inf', '(' .. ARGV[10]) == 0
  and #redis.call('ZRANGEBYSCORE', KEYS[5], '-inf', ARGV[12], 'LIMIT', 0, 1) == 0
) then
  redis.call('ZADD', KEYS[2], ARGV[3], ARGV[2])
  return 0
end
redis.call('ZADD', KEYS[3], ARGV[9], ARGV[4])
redis.call('HSET', KEYS[4], ARGV[4], ARGV[5])
if ARGV[11] == '1' then
  redis.call('ZADD', KEYS[5], ARGV[3], ARGV[4])
end
redis.call('SET', KEYS[6], ARGV[6], 'EX', ARGV[7])
redis.call('PUBLISH', ARGV[8], ARGV[4])
return redis.call('ZRANK', KEYS[3], ARGV[4]) + 1
"""
)

# A ready job starts, if it still may and the workers still have room for it: out of the
# ready jobs, into the running ones, its spec handed to the caller (to send) and deleted. One
# whose request ended (its spec gone, a cancel asked, its slot given back) is withdrawn
# instead; so is one whose slot lapsed while it waited (its holder's renewals late), but its
# request is still there, waiting for an answer: the caller ends it, saying so. KEYS:
# capacity, running, order, ready, aging, spec, cancel, the tenant's slots. ARGV: the job's
# reserve, running member, job id. Returns its spec (started), 0 (no room: it stays ready),
# -1 (withdrawn: its request ended) or -2 (withdrawn: its slot lapsed).
FLEET_START = (
    _FLEET_ROOM
    + """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local spec = redis.call('GET', KEYS[6])
local wanted = spec and redis.call('EXISTS', KEYS[7]) == 0
local lease = redis.call('ZSCORE', KEYS[8], ARGV[3])
local live = wanted and lease and tonumber(lease) >= now
if live and capacity >= 0 and redis.call('ZCARD', KEYS[2]) >= limit then
  return 0
end
redis.call('ZREM', KEYS[3], ARGV[3])
redis.call('HDEL', KEYS[4], ARGV[3])
redis.call('ZREM', KEYS[5], ARGV[3])
redis.call('DEL', KEYS[6])
if wanted and not live then
  return -2
end
if not live then
  return -1
end
redis.call('ZADD', KEYS[2], now, ARGV[2])
return spec
"""
)


def fleet_waiting_keys(queues) -> list[str]:
    """What a slot given back looks at to know whether a job waits for room."""
    return [fleet_key(queue, "order") for queue in queues]
