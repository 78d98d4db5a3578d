"""PostgreSQL out of a gateway's reach: every route that needs it answers 503 with a clear
message in its family's shape (never a 500), and the gateway heals when it comes back."""

from collections.abc import Iterator

import httpx
import pytest

from tests.conftest import ADMIN_TOKEN, database_url_through, running_gateway
from tests.stack import Gateway, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def cut_off_gateway(stack_env, database_url, pg_partition, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway that reaches PostgreSQL only through `pg_partition`."""
    env = stack_env | {"GPUHOST_DATABASE_URL": database_url_through(database_url, pg_partition)}
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
