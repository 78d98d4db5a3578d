"""The operator's HTTP API: admin token only, every change in the audit log."""

import uuid

import httpx
import pytest

from harness.helpers import auth, record_usage
from harness.processes import wait_for
from tests.conftest import ADMIN_TOKEN


def admin(gateway, method: str, path: str, token: str = ADMIN_TOKEN, **kwargs) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}", "X-Actor": "ops@example.com"}
    return httpx.request(method, f"{gateway.url}{path}", headers=headers, timeout=30, **kwargs)


def test_an_operator_manages_a_tenant_from_creation_to_revoked_key(gateway, sessions):
    made = admin(gateway, "POST", "/admin/tenants", json={"name": "acme", "tier": "free"})
    assert made.status_code == 201, made.text
    tenant_id = made.json()["id"]
    assert made.json()["tier"] == "free"

    moved = admin(gateway, "PATCH", f"/admin/tenants/{tenant_id}", json={"tier": "max"})
    assert moved.status_code == 200 and moved.json()["tier"] == "max"

    issued = admin(gateway, "POST", f"/admin/tenants/{tenant_id}/keys", json={})
    assert issued.status_code == 201
    key, key_id = issued.json()["key"], issued.json()["id"]
    assert issued.json()["last_four"] == key[-4:]
    assert httpx.get(f"{gateway.url}/api/balance", headers=auth(key)).status_code == 200

    from billing.db import transaction

    with transaction(sessions) as session:
        record_usage(session, uuid.UUID(tenant_id), 2.5)
    shown = admin(gateway, "GET", f"/admin/tenants/{tenant_id}").json()
    assert shown["tier"] == "max" and shown["limit"] == 10
    assert shown["gpu_seconds_this_period"] == pytest.approx(2.5)
    assert [k["id"] for k in shown["keys"]] == [key_id]
    assert "key" not in shown["keys"][0]  # the secret is never shown again
    listed = admin(gateway, "GET", "/admin/tenants").json()["tenants"]
    [listed_here] = [t for t in listed if t["id"] == tenant_id]
    assert listed_here["in_flight"] == 0
    assert listed_here["gpu_seconds_this_period"] == pytest.approx(2.5)
    records = admin(gateway, "GET", f"/admin/usage?tenant={tenant_id}").json()["records"]
    assert [r["gpu_seconds"] for r in records] == [2.5]

    revoked = admin(gateway, "DELETE", f"/admin/keys/{key_id}")
    assert revoked.status_code == 200 and revoked.json()["revoked_at"]
    wait_for(
        lambda: httpx.get(f"{gateway.url}/api/balance", headers=auth(key)).status_code == 401,
        10,
        "the revoked key to be refused",
    )

    entries = admin(gateway, "GET", "/admin/audit?limit=1000").json()["entries"]
    mine = [e for e in entries if e["target"] in (tenant_id, key_id)]
    assert [e["action"] for e in reversed(mine)] == [
        "tenant.create",
        "tenant.set_tier",
        "key.create",
        "key.revoke",
    ]
    assert all(e["actor"] == "ops@example.com" and e["client"] for e in mine)
    assert mine[-2]["detail"] == {"before": "free", "after": "max"}  # set_tier, newest first
    assert key not in str(entries)  # the secret never reaches the log


def test_tenant_keys_and_wrong_tokens_are_refused(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("max")
    refused = admin(gateway, "GET", "/admin/tenants", token=key)
    assert refused.status_code == 403 and "tenant API keys are refused" in refused.json()["error"]
    assert admin(gateway, "GET", "/admin/tenants", token="adm_wrong").status_code == 401
    missing = httpx.get(f"{gateway.url}/admin/tenants", timeout=30)
    assert missing.status_code == 401 and "admin token" in missing.json()["error"]


@pytest.mark.parametrize(
    ("method", "path", "body", "status", "words"),
    [
        ("POST", "/admin/tenants", {"name": "x", "tier": "gold"}, 400, "unknown tier 'gold'"),
        ("POST", "/admin/tenants", {"name": ""}, 400, "name"),
        ("GET", f"/admin/tenants/{uuid.uuid4()}", None, 404, "not found"),
        ("GET", "/admin/tenants/not-a-uuid", None, 400, "not a valid id"),
        ("DELETE", f"/admin/keys/{uuid.uuid4()}", None, 404, "not found"),
        ("POST", f"/admin/tenants/{uuid.uuid4()}/keys", {}, 404, "not found"),
    ],
    ids=["unknown-tier", "empty-name", "unknown-tenant", "bad-id", "unknown-key", "keys-of-nobody"],
)
def test_bad_input_is_named_and_changes_nothing(gateway, method, path, body, status, words):
    before = len(admin(gateway, "GET", "/admin/audit?limit=1000").json()["entries"])
    response = admin(gateway, method, path, json=body)
    assert response.status_code == status
    assert words in response.json()["error"]
    assert len(admin(gateway, "GET", "/admin/audit?limit=1000").json()["entries"]) == before


def test_the_admin_api_is_in_the_openapi_document(gateway):
    paths = httpx.get(f"{gateway.url}/openapi.json", timeout=30).json()["paths"]
    assert {
        "/admin/tenants",
        "/admin/tenants/{tenant_id}/keys",
        "/admin/keys/{key_id}",
        "/admin/audit",
    } <= set(paths)
