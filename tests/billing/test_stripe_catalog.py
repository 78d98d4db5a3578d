"""Stripe's side of the plans, through the official SDK against tests/stripe_server.py: the
GPU-seconds meter, prices per plan, and each tenant's subscription following its tier."""

import uuid
from decimal import Decimal

import pytest

from billing import stripe_catalog, stripe_meter, tenants
from billing.db import transaction
from billing.models import Tenant
from billing.settings import StripeSettings
from config.plans import DEFAULT_PLANS

TIERS = {tier: plan.concurrency for tier, plan in DEFAULT_PLANS.items()}


@pytest.fixture(scope="module")
def settings(fake, database_url) -> StripeSettings:
    return StripeSettings(
        database_url=database_url, stripe_api_key="sk_test_gpuhost", stripe_api_base=fake.url
    )


@pytest.fixture(scope="module")
def api(settings):
    return stripe_meter.client(settings)


@pytest.fixture(scope="module")
def catalog(api, settings):
    meter = stripe_catalog.ensure_meter(api, settings)
    return meter, stripe_catalog.ensure_prices(api, DEFAULT_PLANS, meter)


def test_one_meter_sums_the_relays_events(api, settings, fake, catalog):
    meter_id, _ = catalog
    assert stripe_catalog.ensure_meter(api, settings) == meter_id  # found, not made again
    assert len(fake.meters) == 1
    meter = fake.meters[meter_id]
    assert meter["event_name"] == settings.stripe_meter_event_name
    assert meter["default_aggregation"] == {"formula": "sum"}
    assert meter["customer_mapping"]["event_payload_key"] == "stripe_customer_id"


def test_each_plan_has_its_prices_once(api, fake, catalog):
    meter_id, prices = catalog
    assert set(prices) == set(DEFAULT_PLANS)
    again = stripe_catalog.ensure_prices(api, DEFAULT_PLANS, meter_id)
    assert again == prices and len(fake.prices) == 5  # 3 monthly + 2 metered, none twice

    free, pro = prices["free"], prices["pro"]
    assert free.metered is None  # Free stops at its allowance: nothing to meter beyond it
    monthly = fake.prices[pro.flat]
    assert (monthly["unit_amount"], monthly["lookup_key"]) == (2000, "pro")
    metered = fake.prices[pro.metered]
    assert metered["recurring"] == {
        "interval": "month",
        "interval_count": 1,
        "usage_type": "metered",
        "meter": meter_id,
    }
    # Events are milli-GPU-seconds: the allowance in milli-seconds at 0, then $0.0006 per
    # GPU-second = 0.00006 cents per milli-GPU-second.
    assert metered["tiers"] == [
        {"up_to": 36_000_000, "unit_amount_decimal": "0"},
        {"up_to": None, "unit_amount_decimal": "0.00006"},
    ]


def test_a_price_stripe_cannot_hold_is_refused_by_name():
    with pytest.raises(ValueError, match="0.0000000000001 USD per GPU-second"):
        stripe_catalog._cents_per_milli(Decimal("0.0000000000001"))


def tenant(sessions, api, tier: str) -> uuid.UUID:
    """A tenant with a customer on this module's server (other tenants in the shared test
    database keep theirs: `ensure_customers` would give every one of them a customer here)."""
    with transaction(sessions) as session:
        row = tenants.create_tenant(session, f"t-{uuid.uuid4().hex[:6]}", tier, TIERS)
        row.stripe_customer_id = api.v1.customers.create({"name": row.name}).id
        return row.id


def subscription_of(sessions, fake, tenant_id) -> tuple[dict, Tenant]:
    with sessions() as session:
        row = session.get(Tenant, tenant_id)
    return fake.subscriptions[row.stripe_subscription_id], row


def test_a_tenant_is_subscribed_to_its_tier_and_follows_it(sessions, api, fake, catalog):
    _, prices = catalog
    tenant_id = tenant(sessions, api, "pro")
    stripe_catalog.sync_subscriptions(sessions, api, prices)
    subscription, row = subscription_of(sessions, fake, tenant_id)
    assert subscription["customer"] == row.stripe_customer_id
    assert {i["price"]["id"] for i in subscription["items"]["data"]} == {
        prices["pro"].flat,
        prices["pro"].metered,
    }
    assert row.stripe_subscription_tier == "pro"

    with transaction(sessions) as session:
        tenants.set_tier(session, str(tenant_id), "max", TIERS)
    stripe_catalog.sync_subscriptions(sessions, api, prices)
    moved, row = subscription_of(sessions, fake, tenant_id)
    assert moved["id"] == subscription["id"]  # the same subscription, moved
    assert {i["price"]["id"] for i in moved["items"]["data"]} == {
        prices["max"].flat,
        prices["max"].metered,
    }
    assert row.stripe_subscription_tier == "max"

    with transaction(sessions) as session:
        tenants.set_tier(session, str(tenant_id), "free", TIERS)
    stripe_catalog.sync_subscriptions(sessions, api, prices)
    down, _ = subscription_of(sessions, fake, tenant_id)
    assert [i["price"]["id"] for i in down["items"]["data"]] == [prices["free"].flat]


def test_sync_is_quiet_when_nothing_changed_and_survives_stripe_failing(
    sessions, api, fake, catalog
):
    _, prices = catalog
    tenant_id = tenant(sessions, api, "pro")
    # every call of this pass fails, however many tenants earlier tests left waiting for one
    fake.fail_next(10_000)
    stripe_catalog.sync_subscriptions(sessions, api, prices)
    fake._faults.clear()
    with sessions() as session:
        assert session.get(Tenant, tenant_id).stripe_subscription_id is None  # waits, not lost
    stripe_catalog.sync_subscriptions(sessions, api, prices)
    subscription, _ = subscription_of(sessions, fake, tenant_id)
    made = len(fake.subscriptions)
    stripe_catalog.sync_subscriptions(sessions, api, prices)
    assert len(fake.subscriptions) == made
    assert subscription_of(sessions, fake, tenant_id)[0] == subscription
