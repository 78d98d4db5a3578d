"""Stripe's events, verified on the raw body: POST /billing/stripe/webhook (webhook events:
subscriptions) and POST /billing/stripe/events (an event destination's thin events: meter
error reports, which the relay fetches in full)."""

from fastapi import APIRouter, Request

from api.deps import SessionDep, StateDep
from api.errors import BadRequest, Unavailable
from billing import stripe_events, stripe_meter_errors

router = APIRouter(tags=["billing"])


@router.post("/billing/stripe/webhook")
async def stripe_webhook(request: Request, state: StateDep, session: SessionDep) -> dict:
    """A database outage answers 503 (api.errors), and Stripe retries a non-2xx. An event is
    applied once, in its own order per subscription (billing.stripe_events)."""
    settings = state.settings
    if not settings.stripe_webhook_secret:
        raise Unavailable("Stripe webhooks are not configured on this server")
    payload = await request.body()
    try:
        event = stripe_events.verify(
            payload, request.headers.get("stripe-signature", ""), settings.stripe_webhook_secret
        )
    except stripe_events.BadEvent as exc:
        raise BadRequest(str(exc)) from None
    done = await stripe_events.apply(
        session, event, settings.stripe_price_tiers, set(settings.plans)
    )
    return {"received": True, "result": done}


@router.post("/billing/stripe/events")
async def stripe_thin_events(request: Request, state: StateDep, session: SessionDep) -> dict:
    """A thin event is recorded, not acted on: it carries only its id and type, and the
    gateway holds no Stripe API key to fetch it with (the relay does)."""
    secret = state.settings.stripe_events_secret
    if not secret:
        raise Unavailable("Stripe event destinations are not configured on this server")
    payload = await request.body()
    try:
        notification = stripe_meter_errors.verify(
            payload, request.headers.get("stripe-signature", ""), secret
        )
    except stripe_events.BadEvent as exc:
        raise BadRequest(str(exc)) from None
    recorded = await stripe_meter_errors.receive(session, notification)
    return {"received": True, "recorded": recorded}
