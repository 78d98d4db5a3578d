"""The billing relay as a Celery beat task: `gpuhost billing worker` runs a Celery worker on
the `billing` queue with beat inside it, which runs one relay pass every
`relay_interval_seconds`. Passes that overlap are safe (see `billing.relay`)."""

from celery import Celery

from billing.db import session_factory, sync_engine
from billing.relay import Relay
from billing.settings import StripeSettings

RELAY_TASK = "gpuhost.billing.relay"
BILLING_QUEUE = "billing"


def create_billing_app(settings: StripeSettings, relay: Relay) -> Celery:
    app = Celery("gpuhost-billing")
    app.conf.update(
        broker_url=settings.celery_broker_url,
        broker_connection_retry_on_startup=True,
        task_serializer="json",
        accept_content=["json"],
        task_ignore_result=True,
        task_routes={RELAY_TASK: {"queue": BILLING_QUEUE}},
        worker_hijack_root_logger=False,
        beat_schedule={
            "relay": {
                "task": RELAY_TASK,
                "schedule": settings.relay_interval_seconds,
                # A pass that missed its slot is not worth running late: the next one comes.
                "options": {"expires": settings.relay_interval_seconds},
            }
        },
        beat_schedule_filename=str(settings.relay_beat_schedule_file),
    )

    @app.task(name=RELAY_TASK)
    def relay_pass() -> dict:
        return relay.run_pass(max_seconds=settings.relay_interval_seconds).as_dict()

    return app


def run_billing_worker(settings: StripeSettings) -> None:
    """A Celery worker for the billing queue with beat inside it, until SIGTERM/SIGINT."""
    relay = Relay(settings, session_factory(sync_engine(settings.database_url)))
    if settings.relay_metrics_port:
        from prometheus_client import start_http_server

        start_http_server(
            settings.relay_metrics_port, addr="0.0.0.0", registry=relay.metrics.registry
        )
    settings.relay_beat_schedule_file.parent.mkdir(parents=True, exist_ok=True)
    app = create_billing_app(settings, relay)
    app.worker_main(
        [
            "worker",
            "--beat",
            f"--queues={BILLING_QUEUE}",
            "--pool=solo",
            "--loglevel=INFO",
            "--without-gossip",
            "--without-mingle",
            "--hostname=billing@%h",
        ]
    )
