"""A Stripe-compatible HTTP server for tests, on 127.0.0.1 only: the edge of the world.

It speaks Stripe's wire protocol to the official SDK (form-encoded requests with bracketed
keys and indexed lists, Bearer auth, JSON objects, lists and errors, idempotency keys) for
what gpuhost uses: customers, billing meters, products, prices (lookup keys unique, at most 10
per list request, metered prices backed by a meter, graduated tiers ending at inf, at most 12
decimal places), subscriptions (items of one interval; items added and deleted by update),
meter events and their summaries. It follows Stripe's rules for meter events: an `identifier`
is unique (a repeat is refused, 400 invalid_request_error "An event already exists with
identifier ...", marked not to be retried, as Stripe answers once its idempotency window has
passed), a reused `Idempotency-Key` replays the first response (and is refused with
different parameters; `forget_idempotency_keys` stands for the window passing),
timestamps must lie within the past 35 days and at most 5 minutes ahead, values are numbers.
As Stripe does, it takes (200) a meter event for a customer it does not know and does not
count it; `report_meter_errors` then sends the meter error report an event destination gets:
a thin event (`v1.billing.meter.error_report_triggered`, signed as webhooks are) whose full
event (`GET /v2/core/events/{id}`) names sample events by identifier.
Faults can be injected: failures, slow answers, and a hook between counting an event and
answering.
"""

import hashlib
import hmac
import json
import re
import secrets
import threading
import time
from collections import defaultdict
from datetime import UTC, datetime
from urllib.parse import parse_qsl

import httpx
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from harness.processes import free_port, wait_for

KEY_PART = re.compile(r"\[([^\]]*)\]")


def _nest(pairs) -> dict:
    """Stripe's form encoding, decoded: `a[b][0][c]=v` -> {"a": {"b": [{"c": "v"}]}}."""
    params: dict = {}
    for key, value in pairs:
        head = key.split("[", 1)[0]
        path = [head, *KEY_PART.findall(key[len(head) :])]
        node = params
        for part in path[:-1]:
            node = node.setdefault(part, {})
        node[path[-1]] = value
    return _listify(params)


def _listify(node):
    """Dicts keyed 0, 1, ... are lists."""
    if not isinstance(node, dict):
        return node
    node = {key: _listify(value) for key, value in node.items()}
    if node and all(key.isdigit() for key in node):
        return [node[key] for key in sorted(node, key=int)]
    return node


def _form(body: bytes) -> dict:
    return _nest(parse_qsl(body.decode(), keep_blank_values=True))


def _error(status: int, message: str, code: str, kind: str = "invalid_request_error"):
    return JSONResponse({"error": {"type": kind, "message": message, "code": code}}, status)


def _invalid(message: str, code: str) -> tuple[int, dict]:
    """A 400 as `_replay`'s makers return it."""
    return 400, {"error": {"type": "invalid_request_error", "message": message, "code": code}}


class FakeStripe:
    def __init__(self):
        self.customers: dict[str, dict] = {}
        self.meters: dict[str, dict] = {}
        self.products: dict[str, dict] = {}
        self.prices: dict[str, dict] = {}
        self.subscriptions: dict[str, dict] = {}
        self.events: dict[str, dict] = {}  # by identifier: what the meter counts
        self.posts: defaultdict[str, int] = defaultdict(int)  # meter event POSTs by identifier
        # taken but not counted (its customer unknown), not reported yet: identifier -> error
        self.uncounted: dict[str, tuple[str, str]] = {}
        self.v2_events: dict[str, dict] = {}  # by id: the full events of thin events sent
        # Idempotency-Key: (the request's parameters, the answer's status, body, headers)
        self._idempotent: dict[str, tuple[str, int, dict, dict | None]] = {}
        self._faults: list[tuple[str, float]] = []  # ("fail", status) or ("slow", seconds)
        self._after_event: list = []  # callbacks for the next counted meter events
        self._lock = threading.Lock()
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        app = Starlette(
            routes=[
                Route("/v1/customers", self._customers, methods=["POST"]),
                Route("/v1/billing/meters", self._meters, methods=["GET", "POST"]),
                Route("/v1/products", self._products, methods=["POST"]),
                Route("/v1/prices", self._prices, methods=["GET", "POST"]),
                Route("/v1/subscriptions", self._subscriptions, methods=["POST"]),
                Route("/v1/subscriptions/{id}", self._subscription, methods=["GET", "POST"]),
                Route("/v1/billing/meter_events", self._meter_events, methods=["POST"]),
                Route("/v2/core/events/{id}", self._v2_event, methods=["GET"]),
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

    def forget_idempotency_keys(self) -> None:
        """As Stripe does once a key is 24 hours old: the same key is a new request again."""
        with self._lock:
            self._idempotent.clear()

    def fail_next(self, count: int, status: int = 500) -> None:
        self._faults += [("fail", status)] * count

    def slow_next(self, count: int, seconds: float) -> None:
        """Answer late (the work is still done, as when a client times out on Stripe)."""
        self._faults += [("slow", seconds)] * count

    def after_next_meter_event(self, callback) -> None:
        """Call `callback()` once, after the next meter event is counted and before its 2xx is
        sent: a test stops the sender there, between Stripe's answer and its own commit."""
        self._after_event.append(callback)

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
                seen, status, body, headers = self._idempotent[key]
                if seen != fingerprint:
                    return _error(
                        400,
                        "Keys for idempotent requests can only be used with the "
                        "same parameters they were first used with.",
                        "idempotency_error",
                    )
                replayed = (headers or {}) | {"Idempotent-Replayed": "true"}
                return JSONResponse(body, status, headers=replayed)
            status, body, *extra = make(params)
            headers = extra[0] if extra else None
            if key and status < 500:
                self._idempotent[key] = (fingerprint, status, body, headers)
            return JSONResponse(body, status, headers=headers)

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

    # -- catalog and subscriptions

    @staticmethod
    def _list(request: Request, items: list[dict]) -> JSONResponse:
        return JSONResponse(
            {"object": "list", "data": items, "has_more": False, "url": request.url.path}
        )

    async def _meters(self, request: Request) -> JSONResponse:
        params, failed = await self._common(request)
        if failed:
            return failed
        if request.method == "GET":
            query = _nest(request.query_params.multi_items())
            status = query.get("status")
            return self._list(
                request, [m for m in self.meters.values() if status in (None, m["status"])]
            )

        def make(p: dict):
            for name in ("display_name", "event_name"):
                if not p.get(name):
                    return _invalid(f"Missing required param: {name}.", "parameter_missing")
            formula = (p.get("default_aggregation") or {}).get("formula")
            if formula not in ("count", "sum", "last"):
                return _invalid(
                    "default_aggregation[formula] must be one of count, sum, last",
                    "parameter_invalid_string",
                )
            if any(
                m["event_name"] == p["event_name"] and m["status"] == "active"
                for m in self.meters.values()
            ):
                return _invalid(
                    f"An active meter with event_name {p['event_name']!r} already exists.",
                    "resource_already_exists",
                )
            meter = {
                "id": f"mtr_{secrets.token_hex(8)}",
                "object": "billing.meter",
                "display_name": p["display_name"],
                "event_name": p["event_name"],
                "default_aggregation": {"formula": formula},
                "customer_mapping": p.get("customer_mapping")
                or {"type": "by_id", "event_payload_key": "stripe_customer_id"},
                "value_settings": p.get("value_settings") or {"event_payload_key": "value"},
                "status": "active",
                "created": int(time.time()),
                "livemode": False,
            }
            self.meters[meter["id"]] = meter
            return 200, meter

        return self._replay(request, params, make)

    async def _products(self, request: Request) -> JSONResponse:
        params, failed = await self._common(request)
        if failed:
            return failed

        def make(p: dict):
            if not p.get("name"):
                return _invalid("Missing required param: name.", "parameter_missing")
            product = {
                "id": f"prod_{secrets.token_hex(7)}",
                "object": "product",
                "name": p["name"],
                "active": True,
                "metadata": p.get("metadata", {}),
                "created": int(time.time()),
                "livemode": False,
            }
            self.products[product["id"]] = product
            return 200, product

        return self._replay(request, params, make)

    async def _prices(self, request: Request) -> JSONResponse:
        params, failed = await self._common(request)
        if failed:
            return failed
        if request.method == "GET":
            query = _nest(request.query_params.multi_items())
            keys = query.get("lookup_keys")
            if keys is not None and len(keys) > 10:
                return _error(
                    400, "You may only specify up to 10 lookup_keys.", "parameter_invalid"
                )
            active = query.get("active")
            return self._list(
                request,
                [
                    price
                    for price in self.prices.values()
                    if (keys is None or price["lookup_key"] in keys)
                    and (active is None or str(price["active"]).lower() == active)
                ],
            )
        return self._replay(request, params, self._make_price)

    def _make_price(self, p: dict):
        if p.get("currency") != "usd":
            return _invalid("currency: this server knows usd only.", "parameter_invalid_string")
        if p.get("product") not in self.products:
            return _invalid(f"No such product: '{p.get('product')}'", "resource_missing")
        recurring = p.get("recurring") or {}
        if recurring.get("interval") not in ("day", "week", "month", "year"):
            return _invalid("recurring[interval] is required.", "parameter_missing")
        usage_type = recurring.get("usage_type", "licensed")
        if usage_type == "metered" and recurring.get("meter") not in self.meters:
            return _invalid(
                "Metered prices must be backed by a meter: recurring[meter] is missing or unknown.",
                "parameter_missing",
            )
        scheme = p.get("billing_scheme", "per_unit")
        tiers = p.get("tiers")
        if scheme == "tiered":
            if p.get("tiers_mode") not in ("graduated", "volume") or not tiers:
                return _invalid("Tiered prices need tiers_mode and tiers.", "parameter_missing")
            if tiers[-1].get("up_to") != "inf":
                return _invalid("The last tier's up_to must be inf.", "parameter_invalid")
            decimals = [t.get("unit_amount_decimal", t.get("unit_amount", "0")) for t in tiers]
        else:
            amount = p.get("unit_amount", p.get("unit_amount_decimal"))
            if amount is None:
                return _invalid("Missing required param: unit_amount.", "parameter_missing")
            decimals = [amount]
        for amount in decimals:
            if len(str(amount).partition(".")[2]) > 12:
                return _invalid(
                    "unit_amount_decimal may have at most 12 decimal places.", "parameter_invalid"
                )
        key = p.get("lookup_key")
        if key and any(price["lookup_key"] == key for price in self.prices.values()):
            return _invalid(
                f"A price already uses the lookup key {key!r}.", "lookup_key_already_exists"
            )
        price = {
            "id": f"price_{secrets.token_hex(8)}",
            "object": "price",
            "active": True,
            "currency": "usd",
            "product": p["product"],
            "lookup_key": key,
            "nickname": p.get("nickname"),
            "billing_scheme": scheme,
            "tiers_mode": p.get("tiers_mode"),
            "tiers": [
                {
                    "up_to": None if t["up_to"] == "inf" else int(t["up_to"]),
                    "unit_amount_decimal": t.get("unit_amount_decimal"),
                }
                for t in tiers or []
            ]
            or None,
            "unit_amount": int(p["unit_amount"]) if "unit_amount" in p else None,
            "recurring": {
                "interval": recurring["interval"],
                "interval_count": 1,
                "usage_type": usage_type,
                "meter": recurring.get("meter"),
            },
            "type": "recurring",
            "created": int(time.time()),
            "livemode": False,
        }
        self.prices[price["id"]] = price
        return 200, price

    def _item(self, subscription_id: str, price_id: str) -> dict:
        price = self.prices[price_id]
        item = {
            "id": f"si_{secrets.token_hex(7)}",
            "object": "subscription_item",
            "price": price,
            "subscription": subscription_id,
        }
        if price["recurring"]["usage_type"] == "licensed":
            item["quantity"] = 1
        return item

    def _check_prices(self, price_ids: list[str]):
        for price_id in price_ids:
            if price_id not in self.prices:
                return _invalid(f"No such price: '{price_id}'", "resource_missing")
        if len({self.prices[i]["recurring"]["interval"] for i in price_ids}) > 1:
            return _invalid(
                "All prices on a subscription must have the same recurring interval.",
                "parameter_invalid",
            )
        return None

    async def _subscriptions(self, request: Request) -> JSONResponse:
        params, failed = await self._common(request)
        if failed:
            return failed

        def make(p: dict):
            if p.get("customer") not in self.customers:
                return _invalid(f"No such customer: '{p.get('customer')}'", "resource_missing")
            price_ids = [item.get("price") for item in p.get("items") or []]
            if not price_ids:
                return _invalid("Missing required param: items.", "parameter_missing")
            refused = self._check_prices(price_ids)
            if refused:
                return refused
            subscription_id = f"sub_{secrets.token_hex(8)}"
            subscription = {
                "id": subscription_id,
                "object": "subscription",
                "customer": p["customer"],
                "status": "active",
                "metadata": p.get("metadata", {}),
                "items": {
                    "object": "list",
                    "data": [self._item(subscription_id, i) for i in price_ids],
                    "has_more": False,
                    "url": f"/v1/subscription_items?subscription={subscription_id}",
                },
                "created": int(time.time()),
                "livemode": False,
            }
            self.subscriptions[subscription_id] = subscription
            return 200, subscription

        return self._replay(request, params, make)

    async def _subscription(self, request: Request) -> JSONResponse:
        params, failed = await self._common(request)
        if failed:
            return failed
        subscription = self.subscriptions.get(request.path_params["id"])
        if subscription is None:
            return _error(
                404, f"No such subscription: '{request.path_params['id']}'", "resource_missing"
            )
        if request.method == "GET":
            return JSONResponse(subscription)

        def make(p: dict):
            items = list(subscription["items"]["data"])
            for change in p.get("items") or []:
                if change.get("deleted") == "true":
                    items = [i for i in items if i["id"] != change.get("id")]
                elif change.get("price"):
                    refused = self._check_prices([change["price"]])
                    if refused:
                        return refused
                    items.append(self._item(subscription["id"], change["price"]))
            if not items:
                return _invalid("A subscription needs at least one item.", "parameter_invalid")
            refused = self._check_prices([i["price"]["id"] for i in items])
            if refused:
                return refused
            subscription["items"]["data"] = items
            return 200, subscription

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
            self.posts[identifier] += 1
            if identifier in self.events:
                return (
                    400,
                    {
                        "error": {
                            "type": "invalid_request_error",
                            "message": f"An event already exists with identifier {identifier}.",
                        }
                    },
                    {"Stripe-Should-Retry": "false"},
                )
            event = {
                "object": "billing.meter_event",
                "created": now,
                "livemode": False,
                "event_name": p["event_name"],
                "identifier": identifier,
                "payload": payload,
                "timestamp": timestamp,
            }
            customer = payload.get("stripe_customer_id")
            if customer not in self.customers:  # validated later, as Stripe does: not counted
                message = f"No customer found with the ID {customer!r}"
                self.uncounted[identifier] = ("meter_event_customer_not_found", message)
                return 200, event
            self.events[identifier] = event
            return 200, event

        response = self._replay(request, params, make)
        if response.status_code == 200 and self._after_event:
            self._after_event.pop(0)()
        return response

    def report_meter_errors(self, destination: str, secret: str) -> httpx.Response:
        """Send the meter error report of the events taken and not counted since the last one
        to an event destination, as a signed thin event; its answer."""
        with self._lock:
            uncounted, self.uncounted = self.uncounted, {}
        by_code: dict[str, list[dict]] = defaultdict(list)
        for identifier, (code, message) in uncounted.items():
            by_code[code].append({"error_message": message, "request": {"identifier": identifier}})
        now = datetime.now(UTC).isoformat().replace("+00:00", "Z")
        meter = next(iter(self.meters), "mtr_unknown")
        thin = {
            "id": f"evt_{secrets.token_hex(12)}",
            "object": "v2.core.event",
            "type": "v1.billing.meter.error_report_triggered",
            "created": now,
            "livemode": False,
            "context": None,
            "reason": None,
            "related_object": {
                "id": meter,
                "type": "billing.meter",
                "url": f"/v1/billing/meters/{meter}",
            },
        }
        data = {
            "developer_message_summary": f"{len(uncounted)} meter event(s) could not be counted",
            "reason": {
                "error_count": len(uncounted),
                "error_types": [
                    {"code": code, "error_count": len(samples), "sample_errors": samples}
                    for code, samples in by_code.items()
                ],
            },
            "validation_start": now,
            "validation_end": now,
        }
        self.v2_events[thin["id"]] = thin | {"data": data}
        body = json.dumps(thin).encode()
        stamp = int(time.time())
        digest = hmac.new(secret.encode(), f"{stamp}.".encode() + body, hashlib.sha256)
        headers = {
            "Stripe-Signature": f"t={stamp},v1={digest.hexdigest()}",
            "Content-Type": "application/json",
        }
        return httpx.post(destination, content=body, headers=headers, timeout=30)

    async def _v2_event(self, request: Request) -> JSONResponse:
        if not request.headers.get("authorization", "").startswith("Bearer sk_"):
            return _error(401, "Invalid API Key provided", "api_key_invalid")
        event = self.v2_events.get(request.path_params["id"])
        if event is None:
            return _error(404, "No such event", "resource_missing")
        return JSONResponse(event)

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
