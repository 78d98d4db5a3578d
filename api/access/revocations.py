"""Revoked keys reach every gateway replica at once, whichever path revoked them.

A gateway caches the keys it looked up (`auth_cache_seconds`) and, for PostgreSQL outages,
the keys it knew (`ledger_outage_grace_seconds`). A revocation is announced on a Redis pub/sub
channel (`workers.keyspace.KEYS_REVOKED`) after its commit, by the gateway that made it or by
the command line; every gateway follows the channel and drops the key from both caches as the
message arrives. A gateway that lost the channel (Redis restarted, the connection dropped or
went silent) cannot know what it missed: when it follows the channel again it drops every
cached key, and looks each up again on its next use.
"""

import asyncio
import logging
import uuid

from api.errors import REDIS_AWAY
from api.state import AppState
from workers.keyspace import KEYS_REVOKED

log = logging.getLogger(__name__)

# A channel silent this long is pinged; one that does not answer within the next as long is
# taken for lost.
QUIET_SECONDS = 5.0
RETRY_SECONDS = 0.5


async def announce(state: AppState, key_id: uuid.UUID | str) -> None:
    """A key was revoked (committed): this gateway drops it now, the others as they hear."""
    state.forget_key(key_id)
    try:
        await state.redis.publish(KEYS_REVOKED, str(key_id))
    except REDIS_AWAY as exc:
        # Every gateway's subscription is down with Redis: each drops all its cached keys
        # when it follows the channel again.
        log.warning("could not announce the revocation of key %s: %s", key_id, exc)


async def follow(state: AppState) -> None:
    """Until the gateway stops: drop each key announced as revoked from the caches."""
    while True:
        try:
            await _follow_once(state)
        except REDIS_AWAY as exc:
            log.warning("lost the key revocation channel (%s); following it again", exc)
        except TimeoutError:
            log.warning("the key revocation channel went silent; following it again")
        await asyncio.sleep(RETRY_SECONDS)


async def _follow_once(state: AppState) -> None:
    async with state.redis.pubsub() as channel:
        await channel.subscribe(KEYS_REVOKED)
        state.forget_all_keys()  # whatever was revoked while this gateway was not listening
        state.following_revocations.set()
        try:
            pinged = False
            while True:
                message = await channel.get_message(timeout=QUIET_SECONDS)
                if message is None:
                    if pinged:
                        raise TimeoutError("no answer to a ping")
                    await channel.ping()
                    pinged = True
                    continue
                pinged = False
                if message["type"] == "message":
                    state.forget_key(message["data"].decode())
        finally:
            state.following_revocations.clear()
