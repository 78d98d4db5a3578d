"""POST /billing/stripe/webhook: Stripe's events, verified on the raw body."""

from fastapi import APIRouter, Request
from sqlalchemy.exc import OperationalError

from api.deps import StateDep
from api.errors import BadRequest, Unavailable
from billing import webhooks

router = APIRouter(tags=["billing"])


@router.post("/billing/stripe/webhook")
async def stripe_webhook(request: Request, state: StateDep) -> dict:
    settings = state.settings
    if not settings.stripe_webhook_secret:
        raise Unavailable("Stripe webhooks are not configured on this server")
    payload = await request.body()
    try:
        event = webhooks.verify(
            payload, request.headers.get("stripe-signature", ""), settings.stripe_webhook_secret
        )
    except webhooks.BadSignature as exc:
        raise BadRequest(f"invalid Stripe signature: {exc}") from None
    try:
        async with state.sessions() as session, session.begin():
            done = await webhooks.apply(
                session, event, settings.stripe_price_tiers, set(settings.plans)
            )
    except OperationalError as exc:  # Stripe retries on a non-2xx
        raise Unavailable("the ledger is unavailable; try again shortly") from exc
    return {"received": True, "result": done}
