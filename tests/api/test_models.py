"""/api/tags, /api/ps, /api/show and keep_alive."""

from datetime import UTC, datetime

import httpx
import pytest

from harness.helpers import MODEL, auth, chat_body

pytestmark = pytest.mark.usefixtures("worker")


@pytest.fixture(scope="module")
def key(tenant_factory):
    return tenant_factory.create("pro")[1]


class TestCatalog:
    def test_tags_lists_the_configured_model(self, gateway, key):
        models = httpx.get(f"{gateway.url}/api/tags", headers=auth(key), timeout=30).json()
        by_name = {entry["name"]: entry for entry in models["models"]}
        assert by_name[f"{MODEL}:latest"]["details"]["family"] == "llava"
        assert by_name["stable-diffusion:latest"]["details"]["family"] == "stable-diffusion"

    def test_a_model_was_modified_when_its_weights_were(self, gateway, key, models_dir):
        weights = [p for p in (models_dir / MODEL).rglob("*") if p.is_file()]
        changed = datetime.fromtimestamp(max(p.stat().st_mtime for p in weights), UTC)
        models = httpx.get(f"{gateway.url}/api/tags", headers=auth(key), timeout=30).json()
        [entry] = [m for m in models["models"] if m["name"] == f"{MODEL}:latest"]
        assert datetime.fromisoformat(entry["modified_at"]) == changed  # not the time of asking

    def test_ps_shows_the_resident_model(self, gateway, key):
        httpx.post(
            f"{gateway.url}/api/chat", json=chat_body(num_predict=1), headers=auth(key), timeout=60
        )
        running = httpx.get(f"{gateway.url}/api/ps", headers=auth(key), timeout=30).json()
        [entry] = [m for m in running["models"] if m["model"] == f"{MODEL}:latest"]
        assert entry["model"] == f"{MODEL}:latest"
        assert entry["size"] > 0 and entry["workers"] == 1
        assert entry["context_length"] == 8192
        assert entry["expires_at"] is None  # resident for as long as the worker runs

    def test_show_describes_a_model(self, gateway, key):
        shown = httpx.post(
            f"{gateway.url}/api/show", json={"model": MODEL}, headers=auth(key), timeout=30
        )
        assert shown.status_code == 200
        assert "vision" in shown.json()["capabilities"]
        assert shown.json()["model_info"]["llama.context_length"] == 8192

    def test_show_of_an_unknown_model_is_404(self, gateway, key):
        shown = httpx.post(
            f"{gateway.url}/api/show", json={"model": "nope"}, headers=auth(key), timeout=30
        )
        assert shown.status_code == 404

    def test_catalog_needs_a_key(self, gateway):
        assert httpx.get(f"{gateway.url}/api/tags", timeout=30).status_code == 401


class TestKeepAlive:
    @pytest.mark.parametrize(
        "value, message",
        [
            ("soon", "is not a duration"),
            # found by the OpenAPI fuzz: a worker kept it as a time past the year 9999, and
            # /api/ps could not show it
            (1e16, "is more than a year"),
            ("9000000h", "is more than a year"),
        ],
    )
    def test_a_malformed_or_endless_keep_alive_is_a_clear_400(self, gateway, key, value, message):
        body = chat_body() | {"keep_alive": value}
        response = httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=30)
        assert response.status_code == 400
        assert "field 'keep_alive'" in response.json()["error"]
        assert message in response.json()["error"]

    def test_a_tenants_keep_alive_zero_leaves_the_model_loaded_for_everyone(
        self, gateway, key, tenant_factory, redis_client
    ):
        """The model is every tenant's: one tenant's keep_alive 0 does not unload it (the
        next tenant would pay the reload, billed to nobody)."""
        import time

        from harness.helpers import idle_status

        body = chat_body(num_predict=2) | {"stream": False, "keep_alive": 0}
        asked = time.time()
        answered = httpx.post(f"{gateway.url}/api/chat", json=body, headers=auth(key), timeout=60)
        assert answered.status_code == 200, answered.text
        idle = idle_status(redis_client, after=asked)  # published once that request ended
        assert idle.loaded and idle.expires_at is None
        _, other, _ = tenant_factory.create("pro")
        again = httpx.post(
            f"{gateway.url}/api/chat",
            json=chat_body(num_predict=2) | {"stream": False},
            headers=auth(other),
            timeout=60,
        ).json()
        assert again["load_duration"] == 0
