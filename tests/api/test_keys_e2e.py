"""Key lifecycle through the gateway: revoked and expired keys stop working."""

import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta

import httpx
import pytest

from billing import tenants
from billing.db import transaction
from harness.helpers import auth, chat_body
from harness.processes import wait_for
from harness.services import database_url_through
from tests.conftest import ADMIN_TOKEN, running_gateway


def status(gateway, key) -> int:
    body = {"model": "llava-llama3", "prompt": ""}  # a load-only request: no worker needed
    return httpx.post(
        f"{gateway.url}/api/generate", json=body, headers=auth(key), timeout=30
    ).status_code


@pytest.fixture(scope="module")
def long_cache_replicas(stack_env, tmp_path_factory, pg_partition, database_url):
    """Two replicas that keep the keys they looked up for ten minutes, and trust them for ten
    more while PostgreSQL is away: only a revocation's announcement can make them refuse a
    revoked key soon. The second reaches PostgreSQL through a proxy the test can cut."""
    env = stack_env | {
        "GPUHOST_AUTH_CACHE_SECONDS": "600",
        "GPUHOST_LEDGER_OUTAGE_GRACE_SECONDS": "600",
        "GPUHOST_QUOTA_CACHE_SECONDS": "600",
    }
    cut_off = env | {"GPUHOST_DATABASE_URL": database_url_through(database_url, pg_partition)}
    for first in running_gateway("replica-a", env, tmp_path_factory):
        for second in running_gateway("replica-b", cut_off, tmp_path_factory):
            yield first, second


def refused_on_both(replicas, key) -> None:
    for replica in replicas:
        wait_for(lambda r=replica: status(r, key) == 401, 10, f"{replica.name} to refuse the key")


class TestRevocation:
    def test_a_key_revoked_in_the_ledger_alone_stops_within_the_cache_time(
        self, gateway, second_gateway, tenant_factory, sessions
    ):
        _, key, key_id = tenant_factory.create("free")
        assert status(gateway, key) == 200
        assert status(second_gateway, key) == 200  # both replicas have it cached now
        with transaction(sessions) as session:
            tenants.revoke_key(session, str(key_id))
        refused_on_both((gateway, second_gateway), key)

    def test_revoked_through_the_admin_api_it_is_refused_on_every_replica_at_once(
        self, long_cache_replicas, tenant_factory
    ):
        first, second = long_cache_replicas
        _, key, key_id = tenant_factory.create("free")
        assert status(first, key) == 200 and status(second, key) == 200  # cached on both
        revoked = httpx.delete(
            f"{first.url}/admin/keys/{key_id}", headers=auth(ADMIN_TOKEN), timeout=30
        )
        assert revoked.status_code == 200, revoked.text
        assert status(first, key) == 401  # the replica that revoked it: at once
        refused_on_both(long_cache_replicas, key)

    def test_revoked_by_the_command_line_it_is_refused_on_every_replica(
        self, long_cache_replicas, tenant_factory, stack_env
    ):
        _, key, key_id = tenant_factory.create("free")
        assert all(status(replica, key) == 200 for replica in long_cache_replicas)
        done = subprocess.run(
            [sys.executable, "-m", "cli", "admin", "key", "revoke", str(key_id)],
            env=os.environ | stack_env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode == 0, done.stderr
        assert "not announced" not in done.stderr
        refused_on_both(long_cache_replicas, key)

    def test_a_revoked_key_is_not_trusted_through_a_database_outage(
        self, long_cache_replicas, tenant_factory, pg_partition
    ):
        first, second = long_cache_replicas
        _, key, key_id = tenant_factory.create("free")
        assert status(second, key) == 200  # known to the second replica
        pg_partition.cut()
        try:
            assert status(second, key) == 200  # trusted within the outage grace
            revoked = httpx.delete(
                f"{first.url}/admin/keys/{key_id}", headers=auth(ADMIN_TOKEN), timeout=30
            )
            assert revoked.status_code == 200, revoked.text
            # no longer trusted: refused, or 503 until the ledger says what the key is
            wait_for(lambda: status(second, key) == 503, 10, "the outage cache to drop it")
        finally:
            pg_partition.restore()
        wait_for(lambda: status(second, key) == 401, 30, "the second replica to refuse it")

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
