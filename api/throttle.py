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

    def _keys(self, address: str, presented: str) -> list[str]:
        keys = [credential_failures_key("address", address)]
        if len(presented) >= PREFIX_CHARS:
            keys.append(credential_failures_key("prefix", presented[:PREFIX_CHARS]))
        return keys

    async def check(self, address: str, presented: str) -> None:
        """TooManyRequests if this address or prefix is over its failures in this window."""
        if self.limit <= 0:
            return
        keys = self._keys(address, presented)
        counts = await self.redis.mget(keys)
        for key, count in zip(keys, counts, strict=True):
            if count is not None and int(count) >= self.limit:
                wait = max(1, await self.redis.ttl(key))
                what = "this address" if ":address:" in key else "keys starting with this prefix"
                raise Throttled(
                    f"too many failed credentials from {what}; try again in {wait} s",
                    headers={"Retry-After": str(wait)},
                )

    async def failed(self, address: str, presented: str) -> None:
        if self.limit <= 0:
            return
        async with self.redis.pipeline(transaction=False) as pipe:
            for key in self._keys(address, presented):
                pipe.incr(key)
                pipe.expire(key, self.window, nx=True)
            await pipe.execute()
