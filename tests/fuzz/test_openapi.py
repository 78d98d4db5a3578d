"""Schemathesis over the gateway's whole OpenAPI document, with a valid Max-tier key:
whatever it sends, no 5xx, and every documented response matches its schema."""

import re
from collections import defaultdict

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error, response_schema_conformance

from harness.helpers import auth

EXAMPLES_PER_OPERATION = 25
# Work sizes are clamped (the values stay valid) so that a run takes minutes on two CPU cores:
# what is fuzzed is the gateway's handling of input, not how long tiny models take.
BOUNDS = {
    "num_predict": 8,
    "max_tokens": 8,
    "max_completion_tokens": 8,
    "num_inference_steps": 3,
    "width": 64,
    "height": 64,
    "n": 2,
}
SIZE = re.compile(r"^\d+x\d+$")
MODEL_OF = {
    "/api/chat": "llava-llama3",
    "/api/generate": "llava-llama3",
    "/v1/chat/completions": "llava-llama3",
    "/v1/completions": "llava-llama3",
    "/api/show": "llava-llama3",
    "/api/images": "stable-diffusion",
    "/v1/images/generations": "stable-diffusion",
}


def with_limits(path: str, body: dict) -> dict:
    """Bound the work of a request that leaves it to the defaults (an answer up to the
    context window; a 512-pixel image)."""
    if path in ("/api/chat", "/api/generate"):
        options = body.get("options") if isinstance(body.get("options"), dict) else {}
        body = body | {"options": {"num_predict": BOUNDS["num_predict"]} | options}
    elif path in ("/v1/chat/completions", "/v1/completions"):
        body = {"max_tokens": BOUNDS["max_tokens"]} | body
    elif path == "/api/images":
        body = {"width": 64, "height": 64, "num_inference_steps": 3} | body
    elif path == "/v1/images/generations":
        body = {"size": "64x64"} | body
    # A model this server has (any other name is a 404, tested elsewhere): the rest is fuzzed.
    if path in MODEL_OF:
        body = body | {"model": MODEL_OF[path]}
    return bounded(body)


def bounded(value):
    if isinstance(value, dict):
        out = {}
        for key, item in value.items():
            if key in BOUNDS and isinstance(item, int) and not isinstance(item, bool):
                item = min(item, BOUNDS[key])
            elif key == "size" and isinstance(item, str) and SIZE.match(item):
                item = "64x64"
            out[key] = bounded(item)
        return out
    if isinstance(value, list):
        return [bounded(item) for item in value]
    return value


def describe(exc: BaseException) -> str:
    """The failure itself, also when Hypothesis wraps it."""
    inner = getattr(exc, "exceptions", None)
    return "; ".join(describe(e) for e in inner) if inner else f"{type(exc).__name__}: {exc}"


@pytest.mark.timeout(900)
def test_no_server_errors_and_responses_match_the_schema(
    gateway, worker, sd_worker, tenant_factory
):
    key = tenant_factory.create("max")[1]
    schema = schemathesis.openapi.from_url(f"{gateway.url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 15
    failures = []
    statuses: dict[str, list[int]] = defaultdict(list)
    for operation in operations:

        @settings(
            max_examples=EXAMPLES_PER_OPERATION,
            deadline=None,
            derandomize=True,
            database=None,
            suppress_health_check=list(HealthCheck),
        )
        @given(case=operation.as_strategy())
        def fuzz(case):
            if isinstance(case.body, dict):
                case.body = with_limits(case.operation.path, case.body)
            elif isinstance(case.body, list):
                case.body = bounded(case.body)
            response = case.call_and_validate(
                base_url=gateway.url,
                headers=auth(key),
                checks=[not_a_server_error, response_schema_conformance],
                timeout=120,
            )
            statuses[case.operation.label].append(response.status_code)

        try:
            fuzz()
        except Exception as exc:  # one operation's failure must not hide the others'
            failures.append(f"{operation.label}: {describe(exc)[:3000]}")
    assert not failures, "\n\n".join(failures)
    # The fuzzer got past validation too: requests were served, not only refused.
    served = {label for label, codes in statuses.items() if any(c < 300 for c in codes)}
    assert {"POST /api/chat", "POST /v1/chat/completions", "POST /api/images"} <= served, statuses
    assert sum(len(codes) for codes in statuses.values()) >= 5 * len(operations)
