"""Traces (OpenTelemetry), off unless an OTLP endpoint is set: GPUHOST_OTEL_EXPORTER_OTLP_ENDPOINT,
or the standard OTEL_EXPORTER_OTLP_ENDPOINT (`http://collector:4318`; spans go to its
`/v1/traces`, OTLP over HTTP). Off, every span here is OpenTelemetry's no-op one.

One request is one trace across processes: the gateway's request span (FastAPI's
instrumentation), its `admission` (the wait for a slot) and `enqueue` spans; the job carries
the trace's context (`carrier`, W3C `traceparent`) through Redis and the broker, however late
the fleet sends it; the worker's `job` span continues it, with `run` and `usage.write` inside.
Each span carries the request id and the tenant id; the response (`X-Trace-Id`), the log
lines (`trace_id`) and the usage record carry the trace id.
"""

import os
from collections.abc import Iterator
from contextlib import contextmanager

from opentelemetry import propagate, trace

ENDPOINTS = ("GPUHOST_OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_ENDPOINT")
_tracer = trace.get_tracer("gpuhost")
PRODUCER, CONSUMER = trace.SpanKind.PRODUCER, trace.SpanKind.CONSUMER  # the broker hop's ends


def endpoint() -> str | None:
    """The collector's base URL, if one is set."""
    for name in ENDPOINTS:
        if value := os.environ.get(name, "").strip():
            return value.rstrip("/")
    return None


def configure(service: str) -> bool:
    """Export this process's spans (as `service`) if an endpoint is set; whether it is."""
    base = endpoint()
    if base is None:
        return False
    from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider
    from opentelemetry.sdk.trace.export import BatchSpanProcessor

    provider = TracerProvider(resource=Resource.create({"service.name": service}))
    provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(f"{base}/v1/traces")))
    trace.set_tracer_provider(provider)
    return True


@contextmanager
def span(
    name: str,
    parent: dict[str, str] | None = None,
    kind: trace.SpanKind = trace.SpanKind.INTERNAL,
    **attributes,
) -> Iterator[trace.Span]:
    """A span of this process, current within the block; `parent`: a carrier another process
    made (`carrier`), whose trace it continues."""
    context = propagate.extract(parent) if parent else None
    values = {key: str(value) for key, value in attributes.items() if value is not None}
    started = _tracer.start_as_current_span(name, context=context, kind=kind, attributes=values)
    with started as current:
        yield current


def carrier() -> dict[str, str]:
    """The current trace's context, to send along with work another process does."""
    made: dict[str, str] = {}
    propagate.inject(made)
    return made


def trace_id() -> str | None:
    """The current trace's id (32 hex digits), if a span is recording."""
    context = trace.get_current_span().get_span_context()
    return f"{context.trace_id:032x}" if context.is_valid else None
