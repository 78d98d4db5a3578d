"""Failed credentials are counted by the address they came from, across every gateway replica,
and a sender that keeps failing is told to stop.

Every credential is checked; a valid one is never refused, whoever failed before it, from
wherever (DESIGN, invariant 6). Guessing cannot succeed: an API key carries ~142 random bits
and the admin token at least 32 characters, so refusing valid credentials would protect
nothing and would hand out a lockout: anyone who had seen a key's visible prefix, or shared a
client's address, could keep it out. So each API key, admin token or dashboard sign-in that
fails counts against its client address, in Redis, for a window; once the address has failed
`limit` times in it, its failures are answered 429 with Retry-After (the window's rest)
instead of 401, and counted in the metrics, so that a client guessing or misconfigured learns
to stop. The counter always expires with its window, on any Redis of 6.2 or later.
"""

import redis.asyncio as aioredis

from api.errors import TooManyRequests
from workers.keyspace import credential_failures_key


class Throttled(TooManyRequests):
    code = "too_many_failed_credentials"


class CredentialThrottle:
    def __init__(self, client: aioredis.Redis, limit: int, window_seconds: int):
        self.redis = client
        self.limit = limit
        self.window = window_seconds

    async def failed(self, address: str) -> Throttled | None:
        """Count one failed credential from `address`. Returns the 429 to answer it with once
        the address is over its limit in this window; None below it (the caller's own 401)."""
        if self.limit <= 0:
            return None
        key = credential_failures_key(address)
        # One MULTI: the counter is made with its expiry, then counted (INCR keeps the TTL)
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.set(key, 0, ex=self.window, nx=True)
            pipe.incr(key)
            pipe.ttl(key)
            _, count, ttl = await pipe.execute()
        if count <= self.limit:
            return None
        wait = max(1, ttl)
        return Throttled(
            f"too many failed credentials from this address; try again in {wait} s",
            headers={"Retry-After": str(wait)},
        )
