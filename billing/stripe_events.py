"""Stripe's events (its webhooks, inbound): a subscription's state moves its tenant's tier.

`verify` checks the signature on the raw body (the official SDK's scheme) and the event's
shape; `apply` changes the ledger. Subscriptions map to tiers by their price: `price_tiers`
(price id -> tier), else the price's `lookup_key` when it names a tier. Unknown events are
acknowledged and ignored.

Stripe delivers events at least once and in no set order, so an event is applied:
- once: its id is kept (`stripe_events_applied`); the same event again changes nothing;
- in its own time, per subscription: each subscription keeps the time (`created`) of the
  event that last set it (`stripe_subscriptions`); an event about it created earlier is stale;
- only to the subscription it names: the tenant follows its current subscription; an event
  about another (an old one deleted, or one no newer than the current one's last event)
  is recorded and moves nothing.
"""

import json
from datetime import UTC, datetime, timedelta

import stripe
from pydantic import BaseModel, ConfigDict, ValidationError
from sqlalchemy import delete, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from billing.models import StripeEventApplied, StripeSubscription, Tenant

LIVE = {"active", "trialing", "past_due"}
SUBSCRIPTION_EVENTS = {
    "customer.subscription.created",
    "customer.subscription.updated",
    "customer.subscription.deleted",
}
FALLBACK_TIER = "free"
KEEP_DAYS = 30  # an applied event's id is kept this long (Stripe retries one for 3 days)
TOLERANCE_SECONDS = 300  # how old a signature may be (the SDK's default)


class BadEvent(ValueError):
    """A request that is not a Stripe event this endpoint can take: the message says why."""


class Envelope(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    type: str
    created: int
    data: dict


class Subscription(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str
    customer: str
    status: str
    items: dict | None = None


def signed_json(payload: bytes, signature: str, secret: str) -> object:
    """The JSON of a request Stripe signed, its signature checked (webhook events and event
    destinations' thin events alike); BadEvent if the signature or the JSON is wrong."""
    try:
        stripe.WebhookSignature.verify_header(
            payload.decode("utf-8"), signature, secret, TOLERANCE_SECONDS
        )
    except (stripe.SignatureVerificationError, ValueError) as exc:
        raise BadEvent(f"invalid Stripe signature: {exc}") from None
    try:
        return json.loads(payload)
    except ValueError as exc:
        raise BadEvent(f"not JSON: {exc}") from None


def verify(payload: bytes, signature: str, secret: str) -> dict:
    """A webhook event, signed and well formed (id, type, created, data); its subscription
    (`data.object`) well formed too when it is about one."""
    body = signed_json(payload, signature, secret)
    try:
        envelope = Envelope.model_validate(body)
        if envelope.type in SUBSCRIPTION_EVENTS:
            Subscription.model_validate(envelope.data.get("object"))
    except ValidationError as exc:
        error = exc.errors(include_url=False)[0]
        where = ".".join(str(part) for part in error["loc"]) or "the event"
        raise BadEvent(f"not a Stripe event this endpoint takes: {where}: {error['msg']}") from None
    return body


def _tier(subscription: dict, price_tiers: dict[str, str], tiers: set[str]) -> str:
    if subscription.get("status") not in LIVE:
        return FALLBACK_TIER
    for item in (subscription.get("items") or {}).get("data", []):
        price = item.get("price") or {}
        tier = price_tiers.get(price.get("id", "")) or price.get("lookup_key")
        if tier in tiers:
            return tier
    return FALLBACK_TIER


async def _first_time(session: AsyncSession, event: dict) -> bool:
    """Record the event as applied; False if it was already (a retry or a replay)."""
    await session.execute(
        delete(StripeEventApplied).where(
            StripeEventApplied.received_at < datetime.now(UTC) - timedelta(days=KEEP_DAYS)
        )
    )
    added = await session.execute(
        insert(StripeEventApplied)
        .values(id=event["id"], type=event["type"])
        .on_conflict_do_nothing(index_elements=["id"])
        .returning(StripeEventApplied.id)
    )
    return added.first() is not None


async def apply(
    session: AsyncSession, event: dict, price_tiers: dict[str, str], tiers: set[str]
) -> str:
    """Apply one verified event; returns what was done (for the response and the logs)."""
    if not await _first_time(session, event):
        return "duplicate: already applied"
    if event["type"] not in SUBSCRIPTION_EVENTS:
        return "ignored"
    subscription = event["data"]["object"]
    tenant = (
        await session.scalars(
            select(Tenant)
            .where(Tenant.stripe_customer_id == subscription["customer"])
            .with_for_update()
        )
    ).first()
    if tenant is None:
        return "ignored: no tenant has this customer"
    created, named = event["created"], subscription["id"]
    known = await session.get(StripeSubscription, named, with_for_update=True)
    if known is not None and created < known.event_created:
        return f"ignored: older than the last event applied to subscription {named}"
    deleted = event["type"] == "customer.subscription.deleted"
    tier = FALLBACK_TIER if deleted else _tier(subscription, price_tiers, tiers)
    status = "canceled" if deleted else subscription["status"]
    if known is None:
        known = StripeSubscription(id=named, tenant_id=tenant.id)
        session.add(known)
    known.status, known.tier, known.event_created = status, tier, created
    current = tenant.stripe_subscription_id
    if current != named:
        latest = await session.get(StripeSubscription, current) if current else None
        if deleted or tier == FALLBACK_TIER:
            return f"recorded: subscription {named} is not the tenant's current one"
        if latest is not None and created < latest.event_created:
            return f"recorded: subscription {named} is older than the tenant's current one"
    if deleted:
        tenant.tier = FALLBACK_TIER
        # gone: the relay's next pass subscribes the tenant to its (Free) tier again
        tenant.stripe_subscription_id = tenant.stripe_subscription_tier = None
    else:
        tenant.tier = tier  # the fallback while it is not live (unpaid, incomplete, ...)
        # The subscription already carries this tier: nothing for the relay to move.
        tenant.stripe_subscription_id = named
        tenant.stripe_subscription_tier = tier
    return f"tenant {tenant.id} is on {tenant.tier}"
