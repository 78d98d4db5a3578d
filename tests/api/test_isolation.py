"""Tenant isolation, swept: every route that takes an id, tried by the wrong tenant; operator
routes tried with a tenant key; and a database dump searched for usable keys."""

import subprocess

import httpx
from sqlalchemy.engine import make_url

from harness.helpers import auth, chat_body
from harness.services import services
from tests.conftest import ADMIN_TOKEN

# Every path of the OpenAPI document that names something by id, and who may use it.
TENANT_SCOPED = {
    "/v1/images/files/{token}",
    "/api/jobs/{request_id}/stream",
    "/v1/jobs/{job_id}",  # and its cancel: tests/api/test_async_jobs.py
    "/v1/jobs/{job_id}/cancel",
    "/v1/jobs/{job_id}/webhooks",  # tests/webhooks/test_webhooks.py
    # batches: tests/api/test_batches.py
    "/v1/batches/{batch_id}",
    "/v1/batches/{batch_id}/cancel",
    "/v1/batches/{batch_id}/output",
    # files (retrieve, content, delete): tests/api/test_files.py
    "/v1/files/{file_id}",
    "/v1/files/{file_id}/content",
    # fine-tuning jobs and adapters: tests/tuning/test_fine_tuning.py
    "/v1/fine_tuning/jobs/{job_id}",
    "/v1/fine_tuning/jobs/{job_id}/cancel",
    "/v1/adapters/{adapter_id}",
    "/v1/adapters/{adapter_id}/content",
}
OPERATOR_ONLY = {
    "/admin/tenants/{tenant_id}",
    "/admin/tenants/{tenant_id}/keys",
    "/admin/keys/{key_id}",
}
# The same for every tenant: the hosted models (tests/api/test_openai.py).
SHARED = {"/v1/models/{model}"}


def test_the_sweep_covers_every_route_that_takes_an_id(gateway):
    paths = httpx.get(f"{gateway.url}/openapi.json", timeout=30).json()["paths"]
    with_ids = {path for path in paths if "{" in path}
    assert with_ids == TENANT_SCOPED | OPERATOR_ONLY | SHARED  # a new one must be added here


def test_another_tenants_ids_are_not_found(gateway, worker, sd_worker, tenant_factory):
    _, mine, _ = tenant_factory.create("pro")
    _, theirs, _ = tenant_factory.create("max")
    made = httpx.post(
        f"{gateway.url}/v1/images/generations",
        json={"prompt": "a lighthouse", "size": "64x64", "response_format": "url"},
        headers=auth(mine),
        timeout=120,
    )
    assert made.status_code == 200, made.text
    image_url = made.json()["data"][0]["url"]
    chat = httpx.post(
        f"{gateway.url}/api/chat",
        json=chat_body(num_predict=3) | {"stream": False},
        headers=auth(mine),
        timeout=120,
    )
    assert chat.status_code == 200
    stream_url = f"{gateway.url}/api/jobs/{chat.headers['x-request-id']}/stream"
    for url in (image_url, stream_url):
        assert httpx.get(url, headers=auth(mine), timeout=60).status_code == 200
        stranger = httpx.get(url, headers=auth(theirs), timeout=60)
        assert stranger.status_code == 404, (url, stranger.text)


def test_operator_routes_refuse_tenant_keys(gateway, tenant_factory):
    tenant_id, key, key_id = tenant_factory.create("max")
    tries = [
        ("GET", "/admin/tenants"),
        ("POST", "/admin/tenants"),
        ("GET", f"/admin/tenants/{tenant_id}"),
        ("PATCH", f"/admin/tenants/{tenant_id}"),
        ("GET", f"/admin/tenants/{tenant_id}/keys"),
        ("POST", f"/admin/tenants/{tenant_id}/keys"),
        ("DELETE", f"/admin/keys/{key_id}"),
        ("GET", f"/admin/usage?tenant={tenant_id}"),
        ("GET", "/admin/outbox"),
        ("GET", "/admin/audit"),
    ]
    for method, path in tries:
        refused = httpx.request(
            method, f"{gateway.url}{path}", headers=auth(key), json={}, timeout=30
        )
        assert refused.status_code == 403, (method, path, refused.status_code)
    # and the key still works: nothing was done with it
    assert httpx.get(f"{gateway.url}/api/balance", headers=auth(key)).status_code == 200
    admin = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    assert httpx.get(f"{gateway.url}/admin/tenants/{tenant_id}", headers=admin).status_code == 200


def test_a_database_dump_holds_no_usable_key(database_url, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    libpq = make_url(database_url).set(drivername="postgresql")
    dump = subprocess.run(
        [
            services().postgres_program("pg_dump"),
            "--data-only",
            "--dbname",
            libpq.render_as_string(hide_password=False),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "api_keys" in dump and key[-4:] in dump  # the keys' rows are there...
    assert key not in dump  # ...but never a key itself (sha256 only)
    assert key[len("gph_") : -4] not in dump  # nor its secret part
