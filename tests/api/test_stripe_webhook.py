"""Stripe webhooks: verified on the raw body; subscriptions move the tenant's tier."""

import hashlib
import hmac
import json
import time
import uuid

import httpx
import pytest

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
    created: int | None = None,
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
        "created": created if created is not None else int(time.time()),
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
    first, second = "sub_first_" + uuid.uuid4().hex[:6], "sub_second_" + uuid.uuid4().hex[:6]
    now = int(time.time())

    def send(*args, **kwargs) -> None:
        payload = event(*args, **kwargs)
        answered = post(gateway, payload, signed(payload))
        assert answered.status_code == 200, answered.text

    send("customer.subscription.created", customer, "max", subscription_id=first, created=now)
    assert tier(sessions, tenant_id) == "max"
    # The relay will not "move" a subscription Stripe already has on this tier.
    assert subscription(sessions, tenant_id) == (first, "max")
    send("customer.subscription.updated", customer, "pro", subscription_id=first, created=now + 1)
    assert tier(sessions, tenant_id) == "pro"
    send("customer.subscription.updated", customer, "pro", "unpaid", first, created=now + 2)
    assert tier(sessions, tenant_id) == "free"
    send("customer.subscription.created", customer, "pro", subscription_id=second, created=now + 3)
    assert subscription(sessions, tenant_id) == (second, "pro")
    send("customer.subscription.deleted", customer, "pro", "canceled", second, created=now + 4)
    assert tier(sessions, tenant_id) == "free"
    assert subscription(sessions, tenant_id) == (None, None)  # the relay subscribes it anew


class TestOrder:
    """Events are applied once, by their own time per subscription, to the subscription they
    name (Stripe delivers at least once, in no set order)."""

    def test_an_older_event_does_not_undo_a_newer_one(self, gateway, sessions):
        tenant_id, customer = customer_tenant(sessions)
        now = int(time.time())
        newer = event("customer.subscription.updated", customer, "max", "active", "sub_o", now)
        older = event(
            "customer.subscription.updated", customer, "pro", "active", "sub_o", now - 3600
        )
        for payload in (newer, older):
            assert post(gateway, payload, signed(payload)).status_code == 200
        assert tier(sessions, tenant_id) == "max"

    def test_an_old_subscriptions_deletion_leaves_the_current_one(self, gateway, sessions):
        tenant_id, customer = customer_tenant(sessions)
        now = int(time.time())
        for payload in (
            event("customer.subscription.created", customer, "pro", "active", "sub_old", now),
            event("customer.subscription.created", customer, "max", "active", "sub_new", now + 1),
            event("customer.subscription.deleted", customer, "pro", "canceled", "sub_old", now + 2),
        ):
            assert post(gateway, payload, signed(payload)).status_code == 200
        assert tier(sessions, tenant_id) == "max"
        assert subscription(sessions, tenant_id) == ("sub_new", "max")

    def test_a_replayed_event_is_applied_once(self, gateway, sessions):
        tenant_id, customer = customer_tenant(sessions)
        now = int(time.time())
        downgrade = event("customer.subscription.updated", customer, "pro", "active", "sub_r", now)
        upgrade = event(
            "customer.subscription.updated", customer, "max", "active", "sub_r", now + 1
        )
        assert post(gateway, downgrade, signed(downgrade)).status_code == 200
        assert post(gateway, upgrade, signed(upgrade)).status_code == 200
        # the first again, signed afresh within the tolerance (and with a newer clock, its
        # own time unchanged): acknowledged, nothing changes
        again = post(gateway, downgrade, signed(downgrade))
        assert again.status_code == 200 and "already applied" in again.json()["result"]
        assert tier(sessions, tenant_id) == "max"

    @pytest.mark.parametrize(
        "payload, named",
        [
            (b"[1, 2, 3]", "the event"),
            (b'{"id": "evt_x", "type": "customer.subscription.updated", "created": 1}', "data"),
            (
                b'{"id": "evt_y", "type": "customer.subscription.updated", "created": 1,'
                b' "data": {"object": null}}',
                "Input should be a valid dictionary",
            ),
            (b"not json", "not JSON"),
        ],
    )
    def test_a_signed_malformed_event_is_a_400(self, gateway, payload, named):
        answered = post(gateway, payload, signed(payload))
        assert answered.status_code == 400, answered.text
        assert named in answered.json()["error"]


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
            "id": f"evt_{uuid.uuid4().hex[:10]}",
            "object": "event",
            "type": "invoice.paid",
            "created": int(time.time()),
            "data": {"object": {"id": "in_1", "object": "invoice"}},
        }
    ).encode()
    response = post(gateway, payload, signed(payload))
    assert response.status_code == 200 and response.json()["result"] == "ignored"
