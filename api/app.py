"""The gateway application."""

from fastapi import FastAPI

from api import account, dashboard, docs_page, errors
from api.access import revocations
from api.deferred import batches, files, fine_tuning, jobs, resume, webhooks
from api.guards.limits import BodyGuard, UrlGuard
from api.guards.log_context import LogContext
from api.guards.security_headers import SecurityHeaders
from api.ollama.router import router as ollama_router
from api.openai.images import router as openai_images_router
from api.openai.router import router as openai_router
from api.operator import admin, health, metrics, stripe_webhooks
from api.pipeline.batch_runner import BatchRunner
from api.pipeline.scheduler import Scheduler
from api.sd.router import router as sd_router
from api.settings import GatewaySettings
from api.state import lifespan
from config import traces
from webhooks.sender import Sender


def create_app(settings: GatewaySettings | None = None) -> FastAPI:
    settings = settings or GatewaySettings()
    observed = metrics.GatewayMetrics()
    background = [
        lambda state: Scheduler(state, then=[BatchRunner]).run(),
        lambda state: state.fleet.run(),
        lambda state: Sender(state.sessions, state.settings).run(),
        revocations.follow,
        files.sweep_expired,
    ]
    app = FastAPI(
        title="gpuhost",
        version="0.1.0",
        lifespan=lifespan(settings, observed, background),
        docs_url=None,  # FastAPI's pages load from a CDN: api/docs_page serves /docs instead
        redoc_url=None,
    )
    app.state.metrics = observed
    errors.install(app)
    app.include_router(health.router)
    app.include_router(metrics.router)
    app.include_router(ollama_router)
    app.include_router(openai_router)
    app.include_router(sd_router)
    app.include_router(openai_images_router)
    app.include_router(resume.router)
    app.include_router(jobs.router)
    app.include_router(fine_tuning.router)
    app.include_router(webhooks.router)
    app.include_router(batches.router)
    app.include_router(files.router)
    app.include_router(account.router)
    app.include_router(stripe_webhooks.router)
    app.include_router(admin.router)
    dashboard.install(app)
    docs_page.install(app)
    app.add_middleware(
        BodyGuard,
        max_bytes=settings.max_body_bytes,
        uploads={
            fine_tuning.JOBS: settings.max_upload_bytes,
            "/v1/batches": settings.max_upload_bytes,
            "/v1/files": settings.max_upload_bytes,
        },
        anonymous_max_bytes=settings.anonymous_max_body_bytes,
        idle_seconds=settings.body_idle_seconds,
        min_bytes_per_second=settings.body_min_bytes_per_second,
        bodies_per_client=settings.bodies_per_client,
        reading=observed.bodies_reading,
    )
    app.add_middleware(UrlGuard)
    app.add_middleware(metrics.MetricsPort, port=settings.metrics_port)
    app.add_middleware(SecurityHeaders)
    app.add_middleware(metrics.Instrument, metrics=observed)
    app.add_middleware(LogContext)  # its answer's request id, before the access line
    if traces.configure("gpuhost-gateway"):  # an OTLP endpoint is set
        from opentelemetry.instrumentation.fastapi import FastAPIInstrumentor

        FastAPIInstrumentor.instrument_app(app, excluded_urls="healthz,readyz,metrics")
    return app
