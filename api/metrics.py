"""Prometheus metrics of a gateway: requests, latency, refusals, open streams, GPU-seconds.

The registry belongs to the app (made in `create_app`, not a module global), and is served at
GET /metrics in Prometheus' text format.
"""

import time

from fastapi import APIRouter, Request
from fastapi.responses import Response
from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from starlette.types import ASGIApp, Message, Receive, Scope, Send

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
            "GPU-seconds of finished requests relayed by this gateway, by model family.",
            ["family"],
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
            route = getattr(scope.get("route"), "path", "unmatched")
            self.metrics.requests.labels(route, scope["method"], str(status)).inc()
            self.metrics.latency.labels(route).observe(time.perf_counter() - started)


@router.get("/metrics", include_in_schema=False)
async def metrics(request: Request) -> Response:
    registry = request.app.state.metrics.registry
    return Response(generate_latest(registry), media_type=CONTENT_TYPE_LATEST)
