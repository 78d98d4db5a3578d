"""Stripe webhooks: verified on the raw body; subscriptions move the tenant's tier."""

import hashlib
import hmac
import json
import time
import uuid

import httpx

from billing import tenants
from billing.db import transaction
from billing.models import Tenant
from harness.services import TIERS
from tests.conftest import WEBHOOK_SECRET


def signed(payload: bytes, secret: str = WEBHOOK_SECRET) -> dict:
    """Stripe's documented signature scheme: t=<time>,v1=HMAC-SHA256(secret, "<t>.<body>")."""
    stamp = int(time.time())
    digest = hmac.new(secret.encode(), f"{stamp}.".encode() + payload, hashlib.sha256).hexdigest()
    return {"Stripe-Signature": f"t={stamp},v1={digest}", "Content-Type": "application/json"}


def event(
    kind: str,
    customer: str,
    lookup_key: str = "pro",
    status: str = "active",
    subscription_id: str | None = None,
) -> bytes:
    subscription = {
        "id": subscription_id or f"sub_{uuid.uuid4().hex[:10]}",
        "object": "subscription",
        "customer": customer,
        "status": status,
        "items": {
            "object": "list",
            "data": [
                {
                    "id": "si_1",
                    "object": "subscription_item",
                    "price": {"id": "price_x", "object": "price", "lookup_key": lookup_key},
                }
            ],
        },
    }
    body = {
        "id": f"evt_{uuid.uuid4().hex[:10]}",
        "object": "event",
        "type": kind,
        "data": {"object": subscription},
        "api_version": "2024-06-20",
        "created": 1,
    }
    return json.dumps(body).encode()


def customer_tenant(sessions) -> tuple[uuid.UUID, str]:
    customer = f"cus_{uuid.uuid4().hex[:12]}"
    with transaction(sessions) as session:
        tenant = tenants.create_tenant(session, "subscriber", "free", TIERS)
        tenant.stripe_customer_id = customer
        return tenant.id, customer


def tier(sessions, tenant_id) -> str:
    with sessions() as session:
        return session.get(Tenant, tenant_id).tier


def subscription(sessions, tenant_id) -> tuple[str | None, str | None]:
    with sessions() as session:
        row = session.get(Tenant, tenant_id)
        return row.stripe_subscription_id, row.stripe_subscription_tier


def post(gateway, payload: bytes, headers: dict) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/billing/stripe/webhook", content=payload, headers=headers, timeout=30
    )


def test_subscription_changes_move_the_tier(gateway, sessions):
    tenant_id, customer = customer_tenant(sessions)
    payload = event("customer.subscription.created", customer, "max")
    assert post(gateway, payload, signed(payload)).status_code == 200
    assert tier(sessions, tenant_id) == "max"
    # The relay will not "move" a subscription Stripe already has on this tier.
    subscription_id = json.loads(payload)["data"]["object"]["id"]
    assert subscription(sessions, tenant_id) == (subscription_id, "max")
    payload = event("customer.subscription.updated", customer, "pro")
    assert post(gateway, payload, signed(payload)).status_code == 200
    assert tier(sessions, tenant_id) == "pro"
    payload = event("customer.subscription.updated", customer, "pro", status="unpaid")
    post(gateway, payload, signed(payload))
    assert tier(sessions, tenant_id) == "free"
    payload = event("customer.subscription.created", customer, "pro")
    post(gateway, payload, signed(payload))
    held, _ = subscription(sessions, tenant_id)
    payload = event("customer.subscription.deleted", customer, "pro", "canceled", held)
    assert post(gateway, payload, signed(payload)).status_code == 200
    assert tier(sessions, tenant_id) == "free"
    assert subscription(sessions, tenant_id) == (None, None)  # the relay subscribes it anew


def test_a_bad_signature_is_400_and_changes_nothing(gateway, sessions):
    tenant_id, customer = customer_tenant(sessions)
    payload = event("customer.subscription.created", customer, "max")
    forged = post(gateway, payload, signed(payload, secret="whsec_someone_else"))
    assert forged.status_code == 400 and "invalid Stripe signature" in forged.json()["error"]
    tampered = post(gateway, payload.replace(b'"max"', b'"pro"'), signed(payload))
    assert tampered.status_code == 400
    assert tier(sessions, tenant_id) == "free"


def test_unknown_events_are_acknowledged_and_ignored(gateway):
    payload = json.dumps(
        {
            "id": "evt_1",
            "object": "event",
            "type": "invoice.paid",
            "data": {"object": {"id": "in_1", "object": "invoice"}},
        }
    ).encode()
    response = post(gateway, payload, signed(payload))
    assert response.status_code == 200 and response.json()["result"] == "ignored"
