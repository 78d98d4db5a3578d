"""Key lifecycle through the gateway: revoked and expired keys stop working."""

from datetime import UTC, datetime, timedelta

import httpx
import pytest
from billing import tenants
from billing.db import transaction
from harness.helpers import auth, chat_body
from harness.processes import wait_for
from tests.conftest import running_gateway


def status(gateway, key) -> int:
    body = {"model": "llava-llama3", "prompt": ""}  # a load-only request: no worker needed
    return httpx.post(
        f"{gateway.url}/api/generate", json=body, headers=auth(key), timeout=30
    ).status_code


class TestRevocation:
    def test_a_revoked_key_is_refused_on_every_replica_within_seconds(
        self, gateway, second_gateway, tenant_factory, sessions
    ):
        _, key, key_id = tenant_factory.create("free")
        assert status(gateway, key) == 200
        assert status(second_gateway, key) == 200  # both replicas have it cached now
        with transaction(sessions) as session:
            tenants.revoke_key(session, str(key_id))
        for replica in (gateway, second_gateway):
            wait_for(
                lambda r=replica: status(r, key) == 401, 10, f"{replica.name} to refuse the key"
            )

    def test_an_expired_key_is_refused(self, gateway, tenant_factory, sessions):
        tenant_id, _, _ = tenant_factory.create("free")
        with transaction(sessions) as session:
            _, key = tenants.create_key(
                session, tenant_id, expires_at=datetime.now(UTC) - timedelta(seconds=1)
            )
        response = httpx.post(
            f"{gateway.url}/api/chat", json=chat_body(), headers=auth(key), timeout=30
        )
        assert response.status_code == 401
        assert "revoked or expired" in response.json()["error"]

    def test_a_key_without_the_inference_scope_is_403(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free", scopes=("usage:read",))
        response = httpx.post(
            f"{gateway.url}/api/chat", json=chat_body(), headers=auth(key), timeout=30
        )
        assert response.status_code == 403
        assert "'inference' scope" in response.json()["error"]


@pytest.fixture(scope="module")
def long_cache_gateway(stack_env, tmp_path_factory):
    """A gateway that keeps looked-up keys for a minute."""
    env = stack_env | {"GPUHOST_AUTH_CACHE_SECONDS": "60"}
    yield from running_gateway("gateway-long-auth-cache", env, tmp_path_factory)


class TestExpiry:
    def test_a_cached_key_stops_at_its_expiry_not_at_the_caches(
        self, long_cache_gateway, tenant_factory, sessions
    ):
        """Revocation reaches a cached key within the cache time, but expiry is an instant."""
        tenant_id, _, _ = tenant_factory.create("free")
        expires = datetime.now(UTC) + timedelta(seconds=3)
        with transaction(sessions) as session:
            _, key = tenants.create_key(session, tenant_id, expires_at=expires)
        assert status(long_cache_gateway, key) == 200  # cached now, for a minute
        wait_for(lambda: status(long_cache_gateway, key) == 401, 10, "the key to expire")
        assert datetime.now(UTC) >= expires
