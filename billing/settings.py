"""Billing's own settings: Stripe, for the relay (`gpuhost billing relay`)."""

from pathlib import Path

from config import StackSettings


class StripeSettings(StackSettings):
    """Stripe, for the billing relay (`gpuhost billing relay`). Without a key, usage simply
    accumulates in the ledger."""

    stripe_api_key: str = ""
    # Only for tests and Stripe-compatible servers; the SDK's default otherwise.
    stripe_api_base: str = ""
    stripe_meter_event_name: str = "gpu_seconds"
    stripe_meter_id: str = ""  # the meter that event name feeds, for reconciliation
    stripe_timeout_seconds: float = 30.0
    relay_batch_size: int = 100
    # A row that failed waits base x 2^(failures - 1) seconds, at most the cap, before a retry.
    relay_backoff_base_seconds: float = 2.0
    relay_backoff_cap_seconds: float = 3600.0
    # 0: one meter event per usage record. N: one event per tenant per N-second window, sent
    # once the window has closed (plus `relay_aggregate_grace_seconds` for late records).
    relay_aggregate_seconds: int = 0
    relay_aggregate_grace_seconds: int = 60
    relay_interval_seconds: float = 5.0
    # Prometheus metrics of `gpuhost billing worker` on this port (0: off).
    relay_metrics_port: int = 0
    # Where `gpuhost billing worker` keeps Celery beat's schedule (a writable path).
    relay_beat_schedule_file: Path = Path(".gpuhost/celerybeat-schedule")
    # Give each tenant a subscription on its tier's prices (and the meter and prices they need).
    stripe_subscriptions: bool = True
    # Unsent rows older than this are reported: Stripe accepts timestamps up to 35 days old.
    relay_alert_after_seconds: float = 6 * 3600
