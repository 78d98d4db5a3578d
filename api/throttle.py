"""Failed credentials slow their sender down, across every gateway replica.

Each API key, admin token or dashboard sign-in that fails counts against the client address
it came from and against the first 8 characters it presented (a key's visible prefix), in
Redis, for a window. Once either count reaches the limit, credentials from that address or
with that prefix are not even checked until the window ends: 429 with Retry-After. A key the
gateway has already verified (in its cache) is never throttled; a key that works resets
nothing (a guesser's one success does not buy more guesses).
"""

import redis.asyncio as aioredis

from api.errors import TooManyRequests
from workers.keyspace import credential_failures_key

PREFIX_CHARS = 8


class Throttled(TooManyRequests):
    code = "too_many_failed_credentials"


class CredentialThrottle:
    def __init__(self, client: aioredis.Redis, limit: int, window_seconds: int):
        self.redis = client
        self.limit = limit
        self.window = window_seconds

    def _counters(self, address: str, presented: str) -> dict[str, str]:
        """The counters a credential counts against: Redis key -> what it counts, in words."""
        counters = {credential_failures_key("address", address): "this address"}
        if len(presented) >= PREFIX_CHARS:
            prefix = credential_failures_key("prefix", presented[:PREFIX_CHARS])
            counters[prefix] = "keys starting with this prefix"
        return counters

    async def check(self, address: str, presented: str) -> None:
        """TooManyRequests if this address or prefix is over its failures in this window."""
        if self.limit <= 0:
            return
        counters = self._counters(address, presented)
        counts = await self.redis.mget(list(counters))
        for (key, what), count in zip(counters.items(), counts, strict=True):
            if count is not None and int(count) >= self.limit:
                wait = max(1, await self.redis.ttl(key))
                raise Throttled(
                    f"too many failed credentials from {what}; try again in {wait} s",
                    headers={"Retry-After": str(wait)},
                )

    async def failed(self, address: str, presented: str) -> None:
        if self.limit <= 0:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self._counters(address, presented):
                pipe.incr(key)
                pipe.expire(key, self.window, nx=True)
            await pipe.execute()
