"""Sends recorded webhook deliveries: signed the Standard Webhooks way (`webhook-id`,
`webhook-timestamp`, `webhook-signature: v1,<base64 HMAC-SHA256 of id.timestamp.body>` with
the tenant's secret), to the address checked just before, retried with exponential backoff,
each attempt recorded. Runs in every gateway; a delivery is claimed by one at a time.

One tenant's receivers cannot slow another's: each delivery runs on its own, within a total
deadline (`webhook_timeout_seconds` from the first byte sent to the status line and headers
read: a receiver trickling its headers is cut off), its answer's body never read (only the
status counts), and a tenant has at most `PER_TENANT` deliveries under way in a gateway while
the others' go on being claimed and sent.
"""

import asyncio
import logging
import uuid
from collections import Counter
from datetime import UTC, datetime
from typing import Protocol

import anyio
import httpx
from sqlalchemy.exc import SQLAlchemyError
from sqlalchemy.ext.asyncio import async_sessionmaker
from standardwebhooks import Webhook

from billing.db import async_transaction
from webhooks import service
from webhooks.targets import TargetRefused, networks, resolve

log = logging.getLogger(__name__)
BATCH = 20  # deliveries claimed in a pass at most
PER_TENANT = 2  # one tenant's deliveries under way at once, per gateway


class SenderSettings(Protocol):
    """What the sender reads of its process's settings (the gateway's)."""

    webhook_allowed_networks: list[str]
    webhook_timeout_seconds: float
    webhook_max_attempts: int
    webhook_backoff_base_seconds: float
    webhook_backoff_cap_seconds: float
    webhook_poll_seconds: float


class Sender:
    def __init__(self, sessions: async_sessionmaker, settings: SenderSettings):
        self.sessions = sessions
        self.settings = settings
        self.allowed = networks(settings.webhook_allowed_networks)
        self.client = httpx.AsyncClient(
            timeout=settings.webhook_timeout_seconds, follow_redirects=False, trust_env=False
        )
        self.busy: Counter[uuid.UUID] = Counter()  # deliveries under way, by tenant
        self._tasks: set[asyncio.Task] = set()

    async def run(self) -> None:
        try:
            while True:
                try:
                    claimed = await self.pass_once()
                except (SQLAlchemyError, OSError) as exc:
                    log.warning("webhook sender: %s", exc)
                    claimed = 0
                except Exception:  # one bad delivery must not stop every tenant's webhooks
                    log.exception("webhook sender pass failed")
                    claimed = 0
                if not claimed:
                    await asyncio.sleep(self.settings.webhook_poll_seconds)
        finally:
            for task in list(self._tasks):
                task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)
            await self.client.aclose()

    async def pass_once(self) -> int:
        """Claim what is due (no tenant past its share) and start sending it; returns how
        many were claimed. A job's events go in order (start before completed)."""
        lease = self.settings.webhook_timeout_seconds * 2 + 5
        busy = [tenant for tenant, count in self.busy.items() if count >= PER_TENANT]
        async with async_transaction(self.sessions) as session:
            due = await service.claim_due(session, BATCH, lease, PER_TENANT, busy)
            by_job: dict[str, list] = {}
            for d in due:
                by_job.setdefault(d.job_id, []).append((d.id, d.tenant_id, d.url, d.body))
        for events in by_job.values():
            tenant = events[0][1]
            self.busy[tenant] += 1
            task = asyncio.create_task(self._send_in_order(events))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)
        return len(due)

    async def _send_in_order(self, events: list) -> None:
        try:
            for event in events:
                await self._send(*event)
        finally:
            tenant = events[0][1]
            self.busy[tenant] -= 1
            if self.busy[tenant] <= 0:
                del self.busy[tenant]

    async def _send(self, delivery_id, tenant_id, url: str, body: str) -> None:
        settings = self.settings
        status_code, error = None, None
        try:
            async with async_transaction(self.sessions) as session:
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
            with anyio.fail_after(settings.webhook_timeout_seconds):
                async with self.client.stream(
                    "POST",
                    target.pinned_url(),
                    content=body,
                    headers=headers,
                    extensions=target.extensions(),
                ) as answer:  # closed unread: the status is the answer
                    status_code = answer.status_code
            if not 200 <= status_code < 300:
                error = f"HTTP {status_code}"
        except TargetRefused as exc:
            error = str(exc)
        except TimeoutError:
            error = f"no answer within {settings.webhook_timeout_seconds:g} s"
        except httpx.HTTPError as exc:
            error = f"{type(exc).__name__}: {exc}"[:500]
        async with async_transaction(self.sessions) as session:
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
