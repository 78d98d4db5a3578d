"""One relay pass: Stripe customers and subscriptions for tenants, then usage to the meter.

Run by `gpuhost billing relay` (a loop) or, in deployments, as a Celery beat task
(`gpuhost billing worker`, `billing.beat`). Any number of passes may run at once: every step
takes its rows with `FOR UPDATE SKIP LOCKED` and every Stripe call carries an idempotency key.
"""

import logging
import time
from dataclasses import asdict, dataclass
from datetime import timedelta

import stripe
from prometheus_client import CollectorRegistry, Counter, Gauge
from sqlalchemy.orm import Session, sessionmaker

from billing import stripe_catalog, stripe_meter, stripe_meter_errors
from billing.settings import StripeSettings

log = logging.getLogger("gpuhost.billing")


@dataclass(frozen=True)
class Summary:
    customers: int  # Stripe customers made
    subscriptions: int  # subscriptions made or moved to a new tier
    sent: int  # meter events accepted by Stripe
    failed: int  # meter events refused or not answered (retried later)
    already_delivered: int  # of `sent`: Stripe already had them (their identifier)
    waiting_for_customer: int
    stale: int  # unsent rows older than the alert threshold
    rejected: int = 0  # rows Stripe's meter error reports named (fetched this pass)

    def as_dict(self) -> dict:
        return asdict(self)


class RelayMetrics:
    """What `gpuhost billing worker` serves on GPUHOST_RELAY_METRICS_PORT."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.passes = Counter("gpuhost_relay_passes", "Relay passes run.", registry=self.registry)
        self.sent = Counter(
            "gpuhost_relay_events_sent", "Meter events Stripe accepted.", registry=self.registry
        )
        self.stripe_errors = Counter(
            "gpuhost_relay_stripe_errors",
            "Stripe calls that failed (meter events, customers, subscriptions).",
            registry=self.registry,
        )
        self.already_delivered = Counter(
            "gpuhost_relay_events_already_delivered",
            "Meter events Stripe refused as already taken (their identifier): marked sent.",
            registry=self.registry,
        )
        self.rejected = Counter(
            "gpuhost_relay_events_rejected",
            "Meter events Stripe took and then reported it could not count (error reports).",
            registry=self.registry,
        )
        self.stale = Gauge(
            "gpuhost_relay_stale_events",
            "Usage records unsent for longer than the alert threshold.",
            registry=self.registry,
        )


class Relay:
    def __init__(
        self,
        settings: StripeSettings,
        sessions: sessionmaker[Session],
        api: stripe.StripeClient | None = None,
    ):
        self.settings = settings
        self.sessions = sessions
        self.api = api or stripe_meter.client(settings)
        self.metrics = RelayMetrics()
        self._catalog: dict[str, stripe_catalog.PlanPrices] | None = None

    def catalog(self) -> dict[str, stripe_catalog.PlanPrices]:
        """The meter and the plans' prices, found or made once per process."""
        if self._catalog is None:
            meter = stripe_catalog.ensure_meter(self.api, self.settings)
            self._catalog = stripe_catalog.ensure_prices(self.api, self.settings.plans, meter)
        return self._catalog

    def run_pass(self, max_seconds: float = 30.0) -> Summary:
        """Customers, subscriptions, then batches of usage until none is left to send or
        `max_seconds` have passed."""
        customers = subscriptions = 0
        try:
            customers = stripe_meter.ensure_customers(self.sessions, self.api)
            if self.settings.stripe_subscriptions:
                subscriptions = stripe_catalog.sync_subscriptions(
                    self.sessions, self.api, self.catalog()
                )
        except stripe.StripeError as exc:  # usage still goes out; these wait for the next pass
            self.metrics.stripe_errors.inc()
            log.warning("Stripe customers/subscriptions not synced this pass: %s", exc)
        rejected = 0
        try:
            rejected = stripe_meter_errors.fetch_reports(self.sessions, self.api)
        except stripe.StripeError as exc:  # the reports wait for the next pass
            self.metrics.stripe_errors.inc()
            log.warning("Stripe meter error reports not fetched this pass: %s", exc)
        sent = failed = duplicates = 0
        deadline = time.monotonic() + max_seconds
        while True:
            done = stripe_meter.relay_once(self.sessions, self.api, self.settings)
            sent, failed = sent + done.sent, failed + done.failed
            duplicates += done.already_delivered
            if not done.sent or time.monotonic() >= deadline:
                break
        alert_after = timedelta(seconds=self.settings.relay_alert_after_seconds)
        stale = stripe_meter.stale(self.sessions, alert_after)
        if stale:
            log.error(
                "%d usage event(s) unsent for over %s: Stripe only accepts events up to "
                "35 days old",
                stale,
                alert_after,
            )
        self.metrics.passes.inc()
        self.metrics.sent.inc(sent)
        self.metrics.stripe_errors.inc(failed)
        self.metrics.already_delivered.inc(duplicates)
        self.metrics.stale.set(stale)
        self.metrics.rejected.inc(rejected)
        return Summary(
            customers,
            subscriptions,
            sent,
            failed,
            duplicates,
            done.waiting_for_customer,
            stale,
            rejected,
        )
