"""Sends recorded webhook deliveries: signed the Standard Webhooks way (`webhook-id`,
`webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>` with
the tenant's secret), to the address checked just before, retried with exponential backoff,
each attempt recorded. Runs in every gateway; a delivery is claimed by one at a time."""

import asyncio
import logging
from datetime import UTC, datetime

import anyio
import httpx
from sqlalchemy.exc import SQLAlchemyError
from standardwebhooks import Webhook

from webhooks import service
from webhooks.targets import TargetRefused, networks, resolve

log = logging.getLogger(__name__)
BATCH = 20


class Sender:
    def __init__(self, state):
        self.state = state
        settings = state.settings
        self.allowed = networks(settings.webhook_allowed_networks)
        self.client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
        )

    async def run(self) -> None:
        try:
            while True:
                try:
                    sent = await self.pass_once()
                except (SQLAlchemyError, OSError) as exc:
                    log.warning("webhook sender: %s", exc)
                    sent = 0
                except Exception:  # one bad delivery must not stop every tenant's webhooks
                    log.exception("webhook sender pass failed")
                    sent = 0
                if not sent:
                    await asyncio.sleep(self.state.settings.webhook_poll_seconds)
        finally:
            await self.client.aclose()

    async def pass_once(self) -> int:
        settings = self.state.settings
        lease = settings.webhook_timeout_seconds * 2 + 5
        async with self.state.sessions() as session, session.begin():
            due = await service.claim_due(session, BATCH, lease)
            by_job: dict[str, list] = {}
            for d in due:  # a job's events go in order (start before completed)
                by_job.setdefault(d.job_id, []).append((d.id, d.tenant_id, d.url, d.body))
        await asyncio.gather(*(self._send_in_order(events) for events in by_job.values()))
        return len(due)

    async def _send_in_order(self, events: list) -> None:
        for event in events:
            await self._send(*event)

    async def _send(self, delivery_id, tenant_id, url: str, body: str) -> None:
        settings = self.state.settings
        status_code, error = None, None
        try:
            async with self.state.sessions() as session, session.begin():
                secret = await service.secret_of(session, tenant_id)
            target = await anyio.to_thread.run_sync(resolve, url, self.allowed)
            now = datetime.now(UTC)
            headers = {
                "content-type": "application/json",
                "user-agent": "gpuhost-webhooks",
                "host": target.host_header(),
                "webhook-id": str(delivery_id),
                "webhook-timestamp": str(int(now.timestamp())),
                "webhook-signature": Webhook(secret).sign(str(delivery_id), now, body),
            }
            answer = await self.client.post(
                target.pinned_url(), content=body, headers=headers, extensions=target.extensions()
            )
            status_code = answer.status_code
            if not answer.is_success:
                error = f"HTTP {status_code}"
        except TargetRefused as exc:
            error = str(exc)
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        async with self.state.sessions() as session, session.begin():
            outcome = await service.attempted(
                session,
                delivery_id,
                status_code=status_code,
                error=error,
                max_attempts=settings.webhook_max_attempts,
                backoff_base=settings.webhook_backoff_base_seconds,
                backoff_cap=settings.webhook_backoff_cap_seconds,
            )
        if error:
            log.info("webhook %s to %s: %s (%s)", delivery_id, url, error, outcome)
