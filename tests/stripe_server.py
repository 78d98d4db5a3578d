"""A Stripe-compatible HTTP server for tests, on 127.0.0.1 only: the edge of the world.

It speaks Stripe's wire protocol to the official SDK (form-encoded requests with bracketed
keys, Bearer auth, JSON objects and errors, idempotency keys) for what gpuhost uses, and
follows Stripe's documented rules for meter events: an `identifier` is unique (a repeat is
accepted and not counted again), a reused `Idempotency-Key` replays the first response (and
is refused with different parameters), timestamps must lie within the past 35 days and at
most 5 minutes ahead, values are numbers. Faults can be injected: failures and slow answers.
"""

import json
import re
import secrets
import threading
import time
from collections import defaultdict
from urllib.parse import parse_qsl

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.stack import free_port, wait_for

BRACKETS = re.compile(r"^([^\[]+)\[([^\]]*)\]$")


def _form(body: bytes) -> dict:
    params: dict = {}
    for key, value in parse_qsl(body.decode(), keep_blank_values=True):
        nested = BRACKETS.match(key)
        if nested:
            params.setdefault(nested.group(1), {})[nested.group(2)] = value
        else:
            params[key] = value
    return params


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"type": kind, "message": message, "code": code}}, status)


class FakeStripe:
    def __init__(self):
        self.customers: dict[str, dict] = {}
        self.events: dict[str, dict] = {}  # by identifier: what the meter counts
        self.posts: defaultdict[str, int] = defaultdict(int)  # meter event POSTs by identifier
        self._idempotent: dict[str, tuple[str, int, dict]] = {}
        self._faults: list[tuple[str, float]] = []  # ("fail", status) or ("slow", seconds)
        self._lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/v1/customers", self._customers, methods=["POST"]),
                Route("/v1/billing/meter_events", self._meter_events, methods=["POST"]),
                Route(
                    "/v1/billing/meters/{meter}/event_summaries", self._summaries, methods=["GET"]
                ),
            ]
        )
        self._server = uvicorn.Server(
            uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning")
        )
        self._thread = threading.Thread(target=self._server.run, daemon=True)

    def start(self) -> "FakeStripe":
        self._thread.start()
        wait_for(lambda: self._server.started, 10, "the fake Stripe server")
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(10)

    # -- test controls

    def fail_next(self, count: int, status: int = 500) -> None:
        self._faults += [("fail", status)] * count

    def slow_next(self, count: int, seconds: float) -> None:
        """Answer late (the work is still done, as when a client times out on Stripe)."""
        self._faults += [("slow", seconds)] * count

    def total(self, customer: str) -> int:
        return sum(
            int(e["payload"]["value"])
            for e in self.events.values()
            if e["payload"]["stripe_customer_id"] == customer
        )

    # -- the API

    async def _common(self, request: Request):
        if not request.headers.get("authorization", "").startswith("Bearer sk_"):
            return None, _error(401, "Invalid API Key provided", "api_key_invalid")
        fault = self._faults.pop(0) if self._faults else None
        if fault and fault[0] == "fail":
            return None, _error(
                int(fault[1]), "An unexpected error occurred.", "api_error", "api_error"
            )
        if fault and fault[0] == "slow":
            time.sleep(fault[1])  # blocks this request only: the server runs it in a thread
        return _form(await request.body()), None

    def _replay(self, request: Request, params: dict, make) -> JSONResponse:
        key = request.headers.get("idempotency-key")
        fingerprint = json.dumps(params, sort_keys=True)
        with self._lock:
            if key and key in self._idempotent:
                seen, status, body = self._idempotent[key]
                if seen != fingerprint:
                    return _error(
                        400,
                        "Keys for idempotent requests can only be used with the "
                        "same parameters they were first used with.",
                        "idempotency_error",
                    )
                return JSONResponse(body, status, headers={"Idempotent-Replayed": "true"})
            status, body = make(params)
            if key and status < 500:
                self._idempotent[key] = (fingerprint, status, body)
            return JSONResponse(body, status)

    async def _customers(self, request: Request) -> JSONResponse:
        params, failed = await self._common(request)
        if failed:
            return failed

        def make(p: dict):
            customer = {
                "id": f"cus_{secrets.token_hex(7)}",
                "object": "customer",
                "name": p.get("name"),
                "metadata": p.get("metadata", {}),
                "created": int(time.time()),
                "livemode": False,
            }
            self.customers[customer["id"]] = customer
            return 200, customer

        return self._replay(request, params, make)

    async def _meter_events(self, request: Request) -> JSONResponse:
        params, failed = await self._common(request)
        if failed:
            return failed

        def make(p: dict):
            payload = p.get("payload", {})
            if not p.get("event_name"):
                return 400, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "parameter_missing",
                        "message": "Missing required param: event_name.",
                    }
                }
            if payload.get("stripe_customer_id") not in self.customers:
                return 400, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "resource_missing",
                        "message": "No such customer",
                    }
                }
            try:
                float(payload.get("value", ""))
            except ValueError:
                return 400, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "invalid_value",
                        "message": "payload[value] must be a number",
                    }
                }
            now = int(time.time())
            timestamp = int(p.get("timestamp", now))
            if timestamp < now - 35 * 86400 or timestamp > now + 300:
                return 400, {
                    "error": {
                        "type": "invalid_request_error",
                        "code": "timestamp_invalid",
                        "message": "timestamp must be within the past 35 days "
                        "and at most 5 minutes in the future",
                    }
                }
            identifier = p.get("identifier") or secrets.token_hex(12)
            event = {
                "object": "billing.meter_event",
                "created": now,
                "livemode": False,
                "event_name": p["event_name"],
                "identifier": identifier,
                "payload": payload,
                "timestamp": timestamp,
            }
            self.posts[identifier] += 1
            self.events.setdefault(identifier, event)  # a repeated identifier is not counted
            return 200, event

        return self._replay(request, params, make)

    async def _summaries(self, request: Request) -> JSONResponse:
        _, failed = await self._common(request)
        if failed:
            return failed
        query = request.query_params
        for name in ("customer", "start_time", "end_time"):
            if name not in query:
                return _error(400, f"Missing required param: {name}.", "parameter_missing")
        start, end = int(query["start_time"]), int(query["end_time"])
        value = sum(
            float(e["payload"]["value"])
            for e in self.events.values()
            if e["payload"]["stripe_customer_id"] == query["customer"]
            and start <= e["timestamp"] < end
        )
        summary = {
            "id": f"mtrusg_{secrets.token_hex(6)}",
            "object": "billing.meter_event_summary",
            "aggregated_value": value,
            "customer": query["customer"],
            "livemode": False,
            "meter": request.path_params["meter"],
            "start_time": start,
            "end_time": end,
        }
        return JSONResponse(
            {"object": "list", "data": [summary], "has_more": False, "url": str(request.url.path)}
        )
