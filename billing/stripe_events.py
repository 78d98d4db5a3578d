"""Stripe's events (its webhooks, inbound): a subscription's state moves its tenant's tier.

`verify` checks the signature on the raw body (the official SDK's scheme); `apply` changes
the ledger. Subscriptions map to tiers by their price: `price_tiers` (price id -> tier), else
the price's `lookup_key` when it names a tier. Unknown events are acknowledged and ignored.
"""

import stripe
from sqlalchemy import select
from sqlalchemy.ext.asyncio import AsyncSession

from billing.models import Tenant

LIVE = {"active", "trialing", "past_due"}
SUBSCRIPTION_EVENTS = {
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
}
FALLBACK_TIER = "free"


class BadSignature(ValueError):
    pass


def verify(payload: bytes, signature: str, secret: str) -> dict:
    try:
        event = stripe.Webhook.construct_event(payload, signature, secret)
    except (stripe.SignatureVerificationError, ValueError) as exc:
        raise BadSignature(str(exc)) from None
    return event.to_dict()


def _tier(subscription: dict, price_tiers: dict[str, str], tiers: set[str]) -> str:
    if subscription.get("status") not in LIVE:
        return FALLBACK_TIER
    for item in (subscription.get("items") or {}).get("data", []):
        price = item.get("price") or {}
        tier = price_tiers.get(price.get("id", "")) or price.get("lookup_key")
        if tier in tiers:
            return tier
    return FALLBACK_TIER


async def apply(
    session: AsyncSession, event: dict, price_tiers: dict[str, str], tiers: set[str]
) -> str:
    """Apply one verified event; returns what was done (for the response and the logs)."""
    if event.get("type") not in SUBSCRIPTION_EVENTS:
        return "ignored"
    subscription = event["data"]["object"]
    tenant = (
        await session.scalars(
            select(Tenant).where(Tenant.stripe_customer_id == subscription.get("customer"))
        )
    ).first()
    if tenant is None:
        return "ignored: no tenant has this customer"
    if event["type"] == "customer.subscription.deleted":
        tenant.tier = FALLBACK_TIER
        if tenant.stripe_subscription_id == subscription.get("id"):
            # gone: the relay's next pass subscribes the tenant to its (Free) tier again
            tenant.stripe_subscription_id = tenant.stripe_subscription_tier = None
    else:
        tenant.tier = _tier(subscription, price_tiers, tiers)
        # The subscription already carries this tier: nothing for the relay to move.
        tenant.stripe_subscription_id = subscription.get("id")
        tenant.stripe_subscription_tier = tenant.tier
    return f"tenant {tenant.id} is on {tenant.tier}"
