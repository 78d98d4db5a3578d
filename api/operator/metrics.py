"""Prometheus metrics of a gateway: requests, latency, refusals, slots in flight per tier,
time to the first chunk, GPU-seconds, and, read at each scrape, queue depths and how far the
Stripe outbox lags.

The registry belongs to the app (made in `create_app`, not a module global), and is served at
GET /metrics in Prometheus' text format.
"""

import time

from fastapi import APIRouter, Request
from fastapi.responses import PlainTextResponse, Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from redis.exceptions import RedisError
from sqlalchemy.exc import SQLAlchemyError
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from billing.usage import outbox_backlog
from workers.contract import LLAVA_QUEUE, SD_QUEUE

router = APIRouter(tags=["operations"])


class GatewayMetrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter(
            "gpuhost_requests",
            "HTTP requests answered.",
            ["route", "method", "status"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "gpuhost_request_seconds",
            "Time to the end of the response (streams included).",
            ["route"],
            registry=self.registry,
            buckets=(0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.in_progress = Gauge(
            "gpuhost_requests_in_progress",
            "Requests being answered now (streams included).",
            registry=self.registry,
        )
        self.refused = Counter(
            "gpuhost_refused",
            "Requests refused for the tenant's plan.",
            ["tier", "reason"],
            registry=self.registry,
        )
        self.gpu_seconds = Counter(
            "gpuhost_billed_gpu_seconds",
            "GPU-seconds of finished requests relayed by this gateway.",
            ["family", "tier"],
            registry=self.registry,
        )
        self.jobs = Counter(
            "gpuhost_jobs",
            "Admitted requests by how they ended (completed, cancelled, or the error status).",
            ["model", "tier", "outcome"],
            registry=self.registry,
        )
        self.first_chunk = Histogram(
            "gpuhost_time_to_first_chunk_seconds",
            "Admission to the first streamed chunk (chat: the first token), queue wait included.",
            ["family"],
            registry=self.registry,
            buckets=(0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120),
        )
        self.in_flight = Gauge(
            "gpuhost_in_flight",
            "Requests holding a slot through this gateway, by tier.",
            ["tier"],
            registry=self.registry,
        )
        self.queue_depth = Gauge(
            "gpuhost_queue_depth",
            "Jobs waiting in each model queue (Redis broker), read at scrape.",
            ["queue"],
            registry=self.registry,
        )
        self.outbox_unsent = Gauge(
            "gpuhost_outbox_unsent",
            "Usage records not yet accepted by Stripe, read at scrape.",
            registry=self.registry,
        )
        self.connections = Gauge(
            "gpuhost_connections_open",
            "Client connections open to this gateway (trusted proxies' too).",
            registry=self.registry,
        )
        self.bodies_reading = Gauge(
            "gpuhost_request_bodies_reading",
            "Request bodies being received now.",
            registry=self.registry,
        )
        self.image_checks = Gauge(
            "gpuhost_image_checks_running",
            "Images (and datasets) being decoded in the gateway's checking threads now.",
            registry=self.registry,
        )
        self.fleet_wait = Histogram(
            "gpuhost_fleet_wait_seconds",
            "Admitted requests' wait for a worker with room, by tier (0: one had room).",
            ["tier"],
            registry=self.registry,
            buckets=(0.0, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
        )
        self.fleet_waiting = Gauge(
            "gpuhost_fleet_waiting",
            "Admitted requests waiting for a worker with room, by model queue and tier, read "
            "at scrape.",
            ["queue", "tier"],
            registry=self.registry,
        )
        self.fleet_capacity = Gauge(
            "gpuhost_fleet_capacity",
            "Requests the workers of a model take at once, and how many they hold now "
            "(state: capacity, in_use), read at scrape.",
            ["queue", "state"],
            registry=self.registry,
        )
        self.scheduler_passes = Counter(
            "gpuhost_scheduler_passes",
            "Passes of this gateway's job scheduler over waiting jobs, batches and webhooks.",
            registry=self.registry,
        )
        self.outbox_lag = Gauge(
            "gpuhost_outbox_oldest_unsent_seconds",
            "Age of the oldest usage record not yet accepted by Stripe (0: none), read at scrape.",
            registry=self.registry,
        )


class Instrument:
    """ASGI middleware counting every request by its route template and final status."""

    def __init__(self, app: ASGIApp, metrics: GatewayMetrics):
        self.app = app
        self.metrics = metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] == "/metrics":
            await self.app(scope, receive, send)
            return
        status = 500
        started = time.perf_counter()

        async def observe(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        self.metrics.in_progress.inc()
        try:
            await self.app(scope, receive, observe)
        finally:
            self.metrics.in_progress.dec()
            route = _route_label(scope)
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


def _route_label(scope: Scope) -> str:
    """The route's path template; for a mounted app (the dashboard's static files), its mount
    path; else "unmatched" (a 404), so that labels stay few whatever paths clients send."""
    route = scope.get("route")
    if route is not None:
        return route.path
    root = scope.get("root_path", "")
    app_root = scope.get("app_root_path", root)
    if root != app_root:  # a Mount matched and extended the root path
        return root[len(app_root) :] + "/{path}"
    return "unmatched"


# Celery's Redis transport keeps a queue's jobs in a list named after it, and one per
# priority step above 0 ("<queue>\x06\x16<step>").
PRIORITY_STEPS = (0, 3, 6, 9)


async def _read_backlogs(state) -> None:
    """Queue depths, the fleet's, and the outbox's lag, read now (a scrape is the only
    reader)."""
    observed = state.metrics
    try:
        for queue, (capacity, in_use, waiting) in (await state.fleet.book.occupancy()).items():
            observed.fleet_capacity.labels(queue, "capacity").set(capacity)
            observed.fleet_capacity.labels(queue, "in_use").set(in_use)
            for tier in state.settings.plans:
                observed.fleet_waiting.labels(queue, tier).set(waiting.get(tier, 0))
    except RedisError:
        pass
    if state.settings.celery_broker_url == state.settings.redis_url:
        for queue in (LLAVA_QUEUE, SD_QUEUE):
            keys = [queue] + [f"{queue}\x06\x16{step}" for step in PRIORITY_STEPS[1:]]
            try:
                lengths = [await state.redis.llen(key) for key in keys]
            except RedisError:
                continue
            observed.queue_depth.labels(queue).set(sum(lengths))
    try:
        async with state.sessions() as session:
            unsent, lag = await outbox_backlog(session)
    except SQLAlchemyError:
        return
    observed.outbox_unsent.set(unsent)
    observed.outbox_lag.set(lag)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    await _read_backlogs(request.state.gpuhost)
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)


class MetricsPort:
    """With a metrics port of its own (GPUHOST_METRICS_PORT), /metrics is answered there and
    only there, and nothing else is: the API's port, which an ingress publishes, shows no
    metrics, and the metrics port serves nothing of the API."""

    def __init__(self, app, port: int):
        self.app = app
        self.port = port

    async def __call__(self, scope, receive, send) -> None:
        if self.port and scope["type"] == "http":
            on_metrics_port = (scope.get("server") or ("", 0))[1] == self.port
            if on_metrics_port != (scope["path"] == "/metrics"):
                await PlainTextResponse("Not Found", 404)(scope, receive, send)
                return
        await self.app(scope, receive, send)
