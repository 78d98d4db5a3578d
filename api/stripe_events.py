"""POST /billing/stripe/webhook: Stripe's events, verified on the raw body."""

from fastapi import APIRouter, Request

from api.deps import SessionDep, StateDep
from api.errors import BadRequest, Unavailable
from billing import stripe_events

router = APIRouter(tags=["billing"])


@router.post("/billing/stripe/webhook")
async def stripe_webhook(request: Request, state: StateDep, session: SessionDep) -> dict:
    """A database outage answers 503 (api.errors), and Stripe retries a non-2xx."""
    settings = state.settings
    if not settings.stripe_webhook_secret:
        raise Unavailable("Stripe webhooks are not configured on this server")
    payload = await request.body()
    try:
        event = stripe_events.verify(
            payload, request.headers.get("stripe-signature", ""), settings.stripe_webhook_secret
        )
    except stripe_events.BadSignature as exc:
        raise BadRequest(f"invalid Stripe signature: {exc}") from None
    done = await stripe_events.apply(
        session, event, settings.stripe_price_tiers, set(settings.plans)
    )
    return {"received": True, "result": done}
