"""Stripe's side of the plans: one Billing Meter for GPU-seconds, a product and prices per
plan, and one subscription per tenant on its tier's prices.

- The meter sums meter events named `stripe_meter_event_name` (the relay's events, in integer
  milli-GPU-seconds), mapped to customers by `stripe_customer_id` in the payload.
- Each plan has a product and a flat monthly price whose `lookup_key` is the tier (the webhook
  maps a subscription back to its tier by it), and, where the plan has an overage price, a
  metered price on the meter with graduated tiers: the plan's included GPU-seconds at 0, then
  the overage price per milli-GPU-second (`lookup_key` = "<tier>_gpu_seconds").
- A tenant's subscription carries its tier's prices; `sync_subscriptions` creates it for a
  tenant that has a customer and none, and moves it to the tenant's tier after a change.

Everything is found before it is made (by event name, by lookup key) and made with
idempotency keys, so running any of it again changes nothing.
"""

import logging
from dataclasses import dataclass
from decimal import Decimal

import stripe
from sqlalchemy import or_, select
from sqlalchemy.orm import Session, sessionmaker

from billing.db import transaction
from billing.models import Tenant
from billing.settings import StripeSettings
from config.plans import Plan

log = logging.getLogger(__name__)

CURRENCY = "usd"
MAX_DECIMALS = 12  # Stripe's limit on unit_amount_decimal
LOOKUP_KEYS_PER_LIST = 10  # Stripe's limit on lookup_keys in one price list request


@dataclass(frozen=True)
class PlanPrices:
    tier: str
    flat: str  # the monthly price
    metered: str | None  # GPU-seconds beyond the allowance; None: the plan has no overage


def metered_lookup_key(tier: str) -> str:
    return f"{tier}_gpu_seconds"


def find_meter(api: stripe.StripeClient, settings: StripeSettings) -> str | None:
    """The id of the active meter for the relay's event name, if there is one."""
    listed = api.v1.billing.meters.list({"status": "active", "limit": 100})
    for meter in listed.auto_paging_iter():
        if meter.event_name == settings.stripe_meter_event_name:
            return meter.id
    return None


def ensure_meter(api: stripe.StripeClient, settings: StripeSettings) -> str:
    """The id of the active meter for the relay's event name, made if there is none."""
    found = find_meter(api, settings)
    if found is not None:
        return found
    event_name = settings.stripe_meter_event_name
    meter = api.v1.billing.meters.create(
        {
            "display_name": "GPU-seconds (milli)",
            "event_name": event_name,
            "default_aggregation": {"formula": "sum"},
            "customer_mapping": {"type": "by_id", "event_payload_key": "stripe_customer_id"},
            "value_settings": {"event_payload_key": "value"},
        },
        {"idempotency_key": f"gpuhost-meter-{event_name}"},
    )
    log.info("made Stripe meter %s for events %r", meter.id, event_name)
    return meter.id


def _cents_per_milli(usd_per_gpu_second: Decimal) -> str:
    """USD per GPU-second as Stripe's unit_amount_decimal: cents per milli-GPU-second."""
    cents = usd_per_gpu_second * 100 / 1000
    text = format(cents.normalize(), "f")
    decimals = len(text.partition(".")[2])
    if decimals > MAX_DECIMALS:
        raise ValueError(
            f"overage price {usd_per_gpu_second:f} USD per GPU-second needs {decimals} decimal "
            f"places in cents per milli-GPU-second; Stripe allows {MAX_DECIMALS}"
        )
    return text


def ensure_prices(
    api: stripe.StripeClient, plans: dict[str, Plan], meter_id: str
) -> dict[str, PlanPrices]:
    """Every plan's prices, by tier, made where missing."""
    keys = [key for tier in plans for key in (tier, metered_lookup_key(tier))]
    found = {}
    for start in range(0, len(keys), LOOKUP_KEYS_PER_LIST):
        chunk = keys[start : start + LOOKUP_KEYS_PER_LIST]
        listed = api.v1.prices.list({"lookup_keys": chunk, "active": True, "limit": 100})
        found |= {price.lookup_key: price.id for price in listed.auto_paging_iter()}
    catalog = {}
    for tier, plan in plans.items():
        flat, metered = found.get(tier), found.get(metered_lookup_key(tier))
        wants_metered = plan.overage_usd_per_gpu_second is not None
        if flat is None or (wants_metered and metered is None):
            product = api.v1.products.create(
                {"name": f"gpuhost {plan.name}", "metadata": {"gpuhost_tier": tier}},
                {"idempotency_key": f"gpuhost-product-{tier}"},
            ).id
        if flat is None:
            flat = api.v1.prices.create(
                {
                    "product": product,
                    "currency": CURRENCY,
                    "unit_amount": int(plan.monthly_price_usd * 100),
                    "recurring": {"interval": "month"},
                    "lookup_key": tier,
                    "nickname": f"{plan.name} monthly",
                },
                {"idempotency_key": f"gpuhost-price-{tier}"},
            ).id
        if wants_metered and metered is None:
            metered = api.v1.prices.create(
                {
                    "product": product,
                    "currency": CURRENCY,
                    "recurring": {"interval": "month", "usage_type": "metered", "meter": meter_id},
                    "billing_scheme": "tiered",
                    "tiers_mode": "graduated",
                    "tiers": [
                        {
                            "up_to": int(plan.included_gpu_seconds * 1000),
                            "unit_amount_decimal": "0",
                        },
                        {
                            "up_to": "inf",
                            "unit_amount_decimal": _cents_per_milli(
                                plan.overage_usd_per_gpu_second
                            ),
                        },
                    ],
                    "lookup_key": metered_lookup_key(tier),
                    "nickname": f"{plan.name} GPU-seconds beyond the allowance (milli)",
                },
                {"idempotency_key": f"gpuhost-price-{metered_lookup_key(tier)}"},
            ).id
        catalog[tier] = PlanPrices(tier, flat, metered if wants_metered else None)
    return catalog


def sync_subscriptions(
    sessions: sessionmaker[Session],
    api: stripe.StripeClient,
    catalog: dict[str, PlanPrices],
) -> int:
    """Give each tenant with a customer a subscription on its tier's prices, or move its
    subscription to its tier; returns how many were made or moved."""
    changed = 0
    with transaction(sessions) as session:
        due = session.scalars(
            select(Tenant)
            .where(
                Tenant.stripe_customer_id.is_not(None),
                or_(
                    Tenant.stripe_subscription_id.is_(None),
                    Tenant.stripe_subscription_tier.is_(None),
                    Tenant.stripe_subscription_tier != Tenant.tier,
                ),
            )
            .with_for_update(skip_locked=True)
        ).all()
        for tenant in due:
            prices = catalog.get(tenant.tier)
            if prices is None:
                log.error("tenant %s is on tier %r, which no plan prices", tenant.id, tenant.tier)
                continue
            wanted = [prices.flat] + ([prices.metered] if prices.metered else [])
            try:
                if tenant.stripe_subscription_id is None:
                    subscription = api.v1.subscriptions.create(
                        {
                            "customer": tenant.stripe_customer_id,
                            "items": [{"price": price} for price in wanted],
                            "metadata": {"gpuhost_tenant_id": str(tenant.id)},
                        },
                        {"idempotency_key": f"gpuhost-subscription-{tenant.id}-{tenant.tier}"},
                    )
                    tenant.stripe_subscription_id = subscription.id
                else:
                    _move(api, tenant.stripe_subscription_id, wanted)
            except stripe.StripeError as exc:  # this tenant waits for the next pass
                log.warning("subscription of tenant %s not synced: %s", tenant.id, exc)
                continue
            tenant.stripe_subscription_tier = tenant.tier
            changed += 1
    return changed


def _move(api: stripe.StripeClient, subscription_id: str, wanted: list[str]) -> None:
    """Replace the subscription's items by the wanted prices (prorated)."""
    current = api.v1.subscriptions.retrieve(subscription_id)
    items = [
        {"id": item.id, "deleted": True}
        for item in current["items"].data
        if item.price.id not in wanted
    ]
    held = {item.price.id for item in current["items"].data}
    items += [{"price": price} for price in wanted if price not in held]
    if items:
        api.v1.subscriptions.update(
            subscription_id, {"items": items, "proration_behavior": "create_prorations"}
        )
