"""PostgreSQL out of a gateway's reach: every route that needs it answers 503 with a clear
message in its family's shape (never a 500), and the gateway heals when it comes back."""

from collections.abc import Iterator

import httpx
import pytest
from sqlalchemy.engine import make_url

from tests.conftest import ADMIN_TOKEN
from tests.proxy import TcpProxy
from tests.stack import Gateway, wait_for

ADMIN = {"Authorization": f"Bearer {ADMIN_TOKEN}"}


@pytest.fixture(scope="module")
def partition(database_url) -> Iterator[TcpProxy]:
    url = make_url(database_url)
    proxy = TcpProxy(url.host or "127.0.0.1", url.port or 5432)
    yield proxy
    proxy.close()


@pytest.fixture(scope="module")
def cut_off_gateway(stack_env, database_url, partition, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway that reaches PostgreSQL only through `partition`."""
    through = make_url(database_url).set(host="127.0.0.1", port=partition.port)
    env = stack_env | {"GPUHOST_DATABASE_URL": through.render_as_string(hide_password=False)}
    process = Gateway("gateway-db-partition", env, tmp_path_factory.mktemp("logs"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


class TestDatabaseOutage:
    def test_routes_answer_503_while_it_is_away_and_heal_after(
        self, cut_off_gateway, partition, tenant_factory
    ):
        url = cut_off_gateway.url
        _, key, _ = tenant_factory.create("pro", scopes=("inference", "usage:read"))
        tenant_auth = {"Authorization": f"Bearer {key}"}
        assert httpx.get(f"{url}/admin/tenants", headers=ADMIN).status_code == 200
        assert httpx.get(f"{url}/api/balance", headers=tenant_auth).status_code == 200

        partition.cut()
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
            partition.restore()

        wait_for(
            lambda: httpx.get(f"{url}/admin/tenants", headers=ADMIN).status_code == 200,
            15,
            "the gateway to reach PostgreSQL again",
        )
        assert httpx.get(f"{url}/api/balance", headers=tenant_auth).status_code == 200
