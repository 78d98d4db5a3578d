"""Traces: with an OTLP endpoint set, one chat request is one trace across processes, sent to
a receiver of the harness's own (the real protobuf payload): the gateway's request span, its
admission and enqueue spans, the worker's job span continuing it through the broker, and the
run and the ledger's write inside, parent to child, each with the request and tenant ids; the
answer and the usage record carry the trace id. Without an endpoint, nothing is traced."""

import pytest

from harness.helpers import ask, usage_rows
from harness.otlp import TraceReceiver
from harness.processes import wait_for
from tests.conftest import apart, stack_apart

pytestmark = pytest.mark.services
SERVER, PRODUCER, CONSUMER = 2, 4, 5  # OTLP's span kinds


@pytest.fixture(scope="module")
def traced_stack(stack_env, tmp_path_factory):
    """A gateway and a worker of their own (their own Redis database), sending their spans to
    a receiver."""
    receiver = TraceReceiver()
    env = apart(stack_env) | {
        "GPUHOST_OTEL_EXPORTER_OTLP_ENDPOINT": receiver.url,
        "OTEL_BSP_SCHEDULE_DELAY": "100",  # milliseconds between exports
    }
    try:
        for gateway, _ in stack_apart("traced", env, tmp_path_factory):
            yield gateway, receiver
    finally:
        receiver.close()


def test_one_request_is_one_trace_across_processes(traced_stack, tenant_factory, sessions):
    gateway, receiver = traced_stack
    tenant_id, key, _ = tenant_factory.create("pro")
    answered = ask(gateway, key)
    assert answered.status_code == 200, answered.text
    request_id, trace_id = answered.headers["x-request-id"], answered.headers["x-trace-id"]
    wanted = {"admission", "enqueue", "job", "run", "usage.write"}

    def spans() -> dict | None:
        found = {span.name: span for span in receiver.of_trace(trace_id)}
        servers = [s for s in found.values() if s.kind == SERVER]
        return found if wanted <= set(found) and servers else None

    found = wait_for(spans, 60, "the request's spans from the gateway and the worker")
    [server] = [span for span in found.values() if span.kind == SERVER]
    assert server.service == "gpuhost-gateway" and server.parent_id == ""
    admission, enqueue, job = found["admission"], found["enqueue"], found["job"]
    assert admission.parent_id == enqueue.parent_id == server.span_id
    assert enqueue.kind == PRODUCER and job.kind == CONSUMER
    assert job.service == "gpuhost-worker-llava" and job.parent_id == enqueue.span_id
    assert found["run"].parent_id == found["usage.write"].parent_id == job.span_id
    for span in (admission, enqueue, job):
        assert span.attributes["request_id"] == request_id
        assert span.attributes["tenant_id"] == str(tenant_id)
    [record] = usage_rows(sessions, request_id)
    assert record.trace_id == trace_id


@pytest.mark.usefixtures("worker")
def test_without_an_endpoint_nothing_is_traced(gateway, tenant_factory, sessions):
    _, key, _ = tenant_factory.create("pro")
    answered = ask(gateway, key, tokens=2)
    assert answered.status_code == 200 and "x-trace-id" not in answered.headers
    [record] = usage_rows(sessions, answered.headers["x-request-id"])
    assert record.trace_id is None
