"""What a failure of Redis tells a client: an outage (Redis out of reach) is a 503 to retry;
a command Redis refuses is the server's bug, a 500, never a 503 that invites a retry."""

import httpx

from harness.helpers import auth, chat_body
from workers.keyspace import slots_key


def test_a_refused_redis_command_is_a_500_not_an_outage(
    gateway, worker, tenant_factory, redis_client
):
    tenant_id, key, _ = tenant_factory.create("pro")
    redis_client.set(slots_key(tenant_id), "not a sorted set")  # WRONGTYPE for the slot script
    try:
        answer = httpx.post(f"{gateway.url}/api/chat", headers=auth(key), json=chat_body())
    finally:
        redis_client.delete(slots_key(tenant_id))
    assert answer.status_code == 500, answer.text
    assert "Retry-After" not in answer.headers
    assert "unavailable" not in answer.text
    # the same tenant, with Redis answering as it should, is served
    answer = httpx.post(
        f"{gateway.url}/api/chat",
        headers=auth(key),
        json=chat_body(num_predict=2) | {"stream": False},
    )
    assert answer.status_code == 200, answer.text
