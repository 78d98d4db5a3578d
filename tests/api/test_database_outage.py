"""PostgreSQL out of a gateway's reach: keys and quota figures it read within the outage
grace still admit requests (issue 18); past it, and on every route that needs the database,
the answer is 503 with a clear message in its family's shape (never a 500); the gateway heals
when it comes back."""

from collections.abc import Iterator

import httpx
import pytest

from harness.helpers import auth, chat_body
from harness.processes import Gateway, wait_for
from harness.services import database_url_through
from tests.conftest import ADMIN_TOKEN, running_gateway

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
GRACE_SECONDS = 6


@pytest.fixture(scope="module")
def cut_off_gateway(stack_env, database_url, pg_partition, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway that reaches PostgreSQL only through `pg_partition`."""
    env = stack_env | {
        "GPUHOST_DATABASE_URL": database_url_through(database_url, pg_partition),
        "GPUHOST_LEDGER_OUTAGE_GRACE_SECONDS": str(GRACE_SECONDS),
        # every request reads its key and figures: only the outage grace can stand in
        "GPUHOST_AUTH_CACHE_SECONDS": "0",
        "GPUHOST_QUOTA_CACHE_SECONDS": "0",
    }
    yield from running_gateway("gateway-db-partition", env, tmp_path_factory)


class TestDatabaseOutage:
    def test_routes_answer_503_while_it_is_away_and_heal_after(
        self, cut_off_gateway, pg_partition, tenant_factory
    ):
        url = cut_off_gateway.url
        _, key, _ = tenant_factory.create("pro", scopes=("inference", "usage:read"))
        tenant_auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/admin/tenants", headers=ADMIN).status_code == 200
        assert httpx.get(f"{url}/api/balance", headers=tenant_auth).status_code == 200

        pg_partition.cut()
        try:
            admin = httpx.get(f"{url}/admin/tenants", headers=ADMIN)
            assert admin.status_code == 503, admin.text
            assert admin.json() == {"error": "the database is unavailable; try again shortly"}
            assert admin.headers["retry-after"] == "1"

            audit = httpx.get(f"{url}/admin/audit", headers=ADMIN)
            assert audit.status_code == 503, audit.text

            # OpenAI-style routes answer in OpenAI's error shape.
            adapters = httpx.get(f"{url}/v1/adapters", headers=tenant_auth)
            assert adapters.status_code == 503, adapters.text
            error = adapters.json()["error"]
            assert error["type"] == "server_error" and "unavailable" in error["message"]

            usage = httpx.get(f"{url}/api/usage", headers=tenant_auth)
            assert usage.status_code == 503, usage.text
            assert "unavailable" in usage.json()["error"]

            assert httpx.get(f"{url}/readyz").status_code == 503
        finally:
            pg_partition.restore()

        wait_for(
            lambda: httpx.get(f"{url}/admin/tenants", headers=ADMIN).status_code == 200,
            15,
            "the gateway to reach PostgreSQL again",
        )
        assert httpx.get(f"{url}/api/balance", headers=tenant_auth).status_code == 200

    def test_keys_and_figures_read_within_the_grace_still_admit_then_503(
        self, cut_off_gateway, pg_partition, tenant_factory, worker
    ):
        url = cut_off_gateway.url
        _, key, _ = tenant_factory.create("pro")
        _, unseen, _ = tenant_factory.create("pro")
        body = {**chat_body(num_predict=2), "stream": False}

        def chat(with_key: str) -> httpx.Response:
            return httpx.post(f"{url}/api/chat", json=body, headers=auth(with_key), timeout=60)

        assert chat(key).status_code == 200  # the gateway reads the key and its figures
        pg_partition.cut()
        try:
            during = chat(key)
            assert during.status_code == 200, during.text
            assert during.json()["done"] is True
            never_seen = chat(unseen)
            assert never_seen.status_code == 503
            assert never_seen.json() == {"error": "the key store is unavailable; try again shortly"}
            refused = wait_for(
                lambda: (answer := chat(key)).status_code == 503 and answer,
                GRACE_SECONDS + 20,
                "the outage grace to run out",
            )
            assert "unavailable" in refused.json()["error"]
        finally:
            pg_partition.restore()
        wait_for(lambda: chat(key).status_code == 200, 15, "admission to heal")
