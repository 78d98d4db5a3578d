"""The chaos load (issue 18): streamed and non-streamed chats, images and async jobs from two
tenants of each tier, each with one more client than its tier allows in flight, while the
stack's faults strike (`harness/chaos/stack.py`), and the observer that watches slots and
claims meanwhile. `run` returns the report (`harness/chaos/report.py`). The clients do what a
careful client of the API does: a stream cut by its gateway is resumed on the other one, an
async job is submitted with an `Idempotency-Key` and sent again with it after a network
failure, and a connection refused goes to the other gateway (what a load balancer does).
"""

import json
import random
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import redis
from sqlalchemy import select

from billing.models import UsageRecord
from harness.chaos.report import report
from harness.chaos.stack import FAULT_KINDS, ChaosStack, FaultDone
from harness.services import TIERS
from workers.keyspace import claim_key, slots_key

KINDS = {"chat_stream": 0.35, "chat": 0.25, "image": 0.15, "job": 0.25}
REQUEST_TIMEOUT = 180.0  # a request not over by then is hung


@dataclass
class Exchange:
    index: int
    tenant: str
    kind: str
    end: str = "hung"  # answered | error | lost (its gateway died, its id unknown) | hung
    request_id: str | None = None
    status: int | None = None
    gpu_seconds: float | None = None
    error: str | None = None
    retries: list[str] = field(default_factory=list)  # how the client carried on
    started: float | None = None  # seconds into the load
    seconds: float | None = None  # how long it took


class Client:
    """One request as a careful client makes it, over whichever gateways are up."""

    def __init__(self, stack: ChaosStack, rng: random.Random):
        self.stack = stack
        self.rng = rng

    def _urls(self, avoid: str | None = None) -> list[str]:
        urls = self.stack.ready_gateway_urls() or [g.url for g in self.stack.gateways()]
        self.rng.shuffle(urls)
        return sorted(urls, key=lambda u: u == avoid)

    def _call(self, out: Exchange, send, avoid: str | None = None):
        """`send(url)` on a gateway; a refused connection (nothing sent) tries the other one,
        for up to 30 s (a restart)."""
        deadline = time.monotonic() + 30
        while True:
            for url in self._urls(avoid):
                try:
                    return url, send(url)
                except httpx.ConnectError:
                    out.retries.append("rerouted")
            if time.monotonic() > deadline:
                raise httpx.ConnectError("no gateway accepted the connection for 30 s")
            time.sleep(0.5)

    def run(self, out: Exchange, key: str, tokens: int) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        try:
            getattr(self, out.kind)(out, headers, tokens)
        except httpx.TimeoutException as exc:
            out.end, out.error = "hung", f"timed out: {exc}"
        except httpx.ConnectError as exc:
            out.end, out.error = "error", f"no gateway: {exc}"

    def chat(self, out: Exchange, headers: dict, tokens: int) -> None:
        body = _chat(tokens) | {"stream": False}

        def send(url: str) -> httpx.Response:
            return httpx.post(f"{url}/api/chat", json=body, headers=headers, timeout=120)

        self._answer(out, send, lambda b: b.get("done") is True)

    def image(self, out: Exchange, headers: dict, tokens: int) -> None:
        body = {"model": "stable-diffusion", "prompt": "a red fox", "num_inference_steps": 2}
        body |= {"width": 64, "height": 64, "seed": tokens}

        def send(url: str) -> httpx.Response:
            return httpx.post(f"{url}/api/images", json=body, headers=headers, timeout=120)

        self._answer(out, send, lambda b: bool(b.get("images")))

    def _answer(self, out: Exchange, send, answered) -> None:
        try:
            _, response = self._call(out, send)
        except (httpx.ReadError, httpx.RemoteProtocolError, httpx.WriteError) as exc:
            out.end, out.error = "lost", f"connection lost with its gateway: {exc!r}"
            return
        out.status = response.status_code
        out.request_id = response.headers.get("x-request-id")
        body = _json(response)
        if response.status_code == 200 and answered(body):
            out.end, out.gpu_seconds = "answered", body.get("gpu_seconds")
        else:
            out.end, out.error = "error", str(body.get("error") or response.text[:200])

    def chat_stream(self, out: Exchange, headers: dict, tokens: int) -> None:
        body = _chat(tokens) | {"stream": True}
        lines: list[dict] = []

        def send(url: str):
            with httpx.stream(
                "POST", f"{url}/api/chat", json=body, headers=headers, timeout=120
            ) as response:
                out.status = response.status_code
                out.request_id = response.headers.get("x-request-id")
                _read(response, lines)

        try:
            self._call(out, send)
        except (httpx.ReadError, httpx.RemoteProtocolError) as exc:
            if out.request_id is None:
                out.end, out.error = "lost", f"connection lost with its gateway: {exc!r}"
                return
            self._resume(out, headers, lines)
        _stream_end(out, lines)

    def _resume(self, out: Exchange, headers: dict, lines: list[dict]) -> None:
        """The stream was cut (its gateway died): pick it up where it stopped, on another
        gateway, for up to 60 s."""
        out.retries.append("resumed")
        deadline = time.monotonic() + 60
        path = f"/api/jobs/{out.request_id}/stream"

        def send(gateway: str):
            with httpx.stream(
                "GET",
                f"{gateway}{path}",
                params={"after": len(lines)},
                headers=headers,
                timeout=120,
            ) as response:
                if response.status_code != 200:
                    response.read()
                    raise _Refused(response)
                _read(response, lines)

        while True:
            try:
                self._call(out, send)
                return
            except (httpx.ReadError, httpx.RemoteProtocolError):
                pass  # that gateway died too
            except _Refused as refused:
                if refused.response.status_code not in (502, 503, 504):
                    status = refused.response.status_code
                    lines.append(_json(refused.response) | {"status": status})
                    return
            if time.monotonic() > deadline:
                return
            time.sleep(0.5)

    def job(self, out: Exchange, headers: dict, tokens: int) -> None:
        kind = "images" if self.rng.random() < 0.3 else "chat"
        if kind == "chat":
            payload = {
                "model": "llava-llama3",
                "messages": [{"role": "user", "content": "Say something"}],
                "max_tokens": tokens,
            }
        else:
            payload = {
                "model": "stable-diffusion",
                "prompt": "a lighthouse",
                "num_inference_steps": 2,
            }
            payload |= {"width": 64, "height": 64}
        body = {"type": kind, "input": payload}
        headers = headers | {"Idempotency-Key": uuid.uuid4().hex}
        view = None
        deadline = time.monotonic() + REQUEST_TIMEOUT - 10
        while view is None:  # submitted again with its key until the gateway answers
            try:
                _, response = self._call(
                    out,
                    lambda u: httpx.post(f"{u}/v1/jobs", json=body, headers=headers, timeout=30),
                )
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout):
                out.retries.append("resubmitted")
                continue
            if response.status_code in (200, 202):
                view = response.json()
            elif response.status_code == 503 and time.monotonic() < deadline:
                out.retries.append("resubmitted")
                time.sleep(1)
            else:
                out.status, out.end = response.status_code, "error"
                out.error = str(_json(response).get("error") or response.text[:200])
                return
        out.request_id = view["id"]
        while view["status"] not in ("succeeded", "failed", "cancelled"):
            if time.monotonic() > deadline:
                return  # hung
            time.sleep(0.3)
            try:
                _, response = self._call(
                    out,
                    lambda u: httpx.get(f"{u}/v1/jobs/{out.request_id}", headers=headers),
                )
            except (httpx.ReadError, httpx.RemoteProtocolError, httpx.ReadTimeout):
                continue
            if response.status_code == 200:
                view = response.json()
            elif response.status_code == 404:
                out.status, out.end = 404, "error"
                out.error = "the job was lost: " + str(_json(response).get("error"))
                return
        out.status = 200
        if view["status"] == "succeeded":
            out.end, out.gpu_seconds = "answered", view["gpu_seconds"]
        else:
            out.end, out.error = "error", f"job {view['status']}: {view.get('error')}"


class _Refused(Exception):
    def __init__(self, response: httpx.Response):
        self.response = response


def _chat(tokens: int) -> dict:
    return {
        "model": "llava-llama3",
        "messages": [{"role": "user", "content": "Describe the weather in a few words"}],
        "options": {"num_predict": tokens},
    }


def _json(response: httpx.Response) -> dict:
    try:
        body = response.json()
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _read(response: httpx.Response, lines: list[dict]) -> None:
    if response.status_code != 200:
        response.read()
        lines.append(_json(response) | {"status": response.status_code})
        return
    for line in response.iter_lines():
        if line.strip():
            lines.append(json.loads(line))


def _stream_end(out: Exchange, lines: list[dict]) -> None:
    last = lines[-1] if lines else {}
    if last.get("done") is True and "error" not in last:
        out.end, out.gpu_seconds = "answered", last.get("gpu_seconds")
    elif last.get("error"):
        out.end, out.error = "error", str(last["error"])
        out.status = last.get("status", out.status)
    else:
        out.end, out.error = "error", "the stream ended without a final chunk"


# -- observing ----------------------------------------------------------------------------------


class Observer:
    """Samples every tenant's slots in Redis: the peak each held, and slots held by requests
    that are over (their record is in the ledger, or their client saw them end and no worker
    runs them) — what a fault may leave behind until it heals."""

    def __init__(self, stack: ChaosStack, tenant_ids: list[str]):
        self.stack = stack
        self.tenant_ids = tenant_ids
        self.peak = dict.fromkeys(tenant_ids, 0)
        self.ended: set[str] = set()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()

    def _live(self) -> dict[str, list[str]]:
        client = self.stack.redis
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
        return {
            t: [m.decode() for m in client.zrangebyscore(slots_key(t), f"({now_ms}", "+inf")]
            for t in self.tenant_ids
        }

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            try:
                for tenant, members in self._live().items():
                    self.peak[tenant] = max(self.peak[tenant], len(members))
            except redis.RedisError:
                pass  # Redis restarting

    def stale(self) -> int:
        """Slots held by requests that are over."""
        try:
            held = [m for members in self._live().values() for m in members]
        except redis.RedisError:
            return -1
        if not held:
            return 0
        with self.stack.sessions() as session:
            recorded = set(
                session.scalars(
                    select(UsageRecord.request_id).where(UsageRecord.request_id.in_(held))
                )
            )
        over = [m for m in held if m in recorded or m in self.ended]
        try:
            running = {m for m in over if self.stack.redis.exists(claim_key(m))}
        except redis.RedisError:
            return -1
        return len([m for m in over if m not in running])

    def slots_back(self, timeout: float = 60) -> float | None:
        """Seconds until no slot is held by a request that is over (None: not within
        `timeout`)."""
        began = time.monotonic()
        while time.monotonic() - began < timeout:
            if self.stale() == 0:
                return round(time.monotonic() - began, 2)
            time.sleep(0.1)
        return None


# -- the run ------------------------------------------------------------------------------------


def run(workdir: Path, requests: int, faults: int, seed: int, per_tier: int = 2) -> dict:
    rng = random.Random(seed)
    stack = ChaosStack(workdir)
    try:
        stack.start()
        return _load(stack, rng, requests, faults, per_tier)
    finally:
        stack.stop()


def _load(stack: ChaosStack, rng: random.Random, requests: int, faults: int, per_tier: int):
    tenants = stack.create_tenants(per_tier)
    tier_of = {t: tier for t, _, tier in tenants}
    key_of = {t: key for t, key, _ in tenants}
    observer = Observer(stack, list(tier_of))
    kinds, weights = zip(*KINDS.items(), strict=True)
    plan = [
        Exchange(i, rng.choice(tenants)[0], rng.choices(kinds, weights)[0]) for i in range(requests)
    ]
    tokens = {o.index: rng.randint(8, 40) for o in plan}
    by_tenant: dict[str, list[Exchange]] = defaultdict(list)
    for outcome in plan:
        by_tenant[outcome.tenant].append(outcome)
    done = Counter()
    lock = threading.Condition()

    def mark(i: int) -> int:
        """Requests that may start before fault i (then the load runs on to the next mark)."""
        return requests if i >= faults else round((i + 1) * requests / (faults + 1))

    allowed = [mark(0)]

    def client_thread(tenant: str, queue: list[Exchange], client: Client) -> None:
        while True:
            with lock:
                if not queue:
                    return
                outcome = queue.pop(0)
                lock.wait_for(lambda o=outcome: o.index < allowed[0])
                done["started"] += 1
                lock.notify_all()
            outcome.started = round(time.monotonic() - began, 2)
            client.run(outcome, key_of[tenant], tokens[outcome.index])
            outcome.seconds = round(time.monotonic() - began - outcome.started, 2)
            with lock:
                done["n"] += 1
                if outcome.request_id:
                    observer.ended.add(outcome.request_id)

    threads = []
    for tenant, queue in by_tenant.items():
        for n in range(TIERS[tier_of[tenant]] + 1):
            client = Client(stack, random.Random(f"{tenant}{n}"))
            threads.append(
                threading.Thread(target=client_thread, args=(tenant, queue, client), daemon=True)
            )
    observer.start()
    began = time.monotonic()
    for thread in threads:
        thread.start()
    order: list[str] = []
    injected: list[FaultDone] = []
    for i in range(faults):
        if not order:
            order = rng.sample(FAULT_KINDS, len(FAULT_KINDS))
        kind = order.pop()
        with lock:  # every request before the mark has started: the load runs on, through
            lock.wait_for(lambda i=i: done["started"] >= mark(i))  # the fault, to the next
            allowed[0] = mark(i + 1)
            lock.notify_all()
        time.sleep(rng.uniform(0.5, 2.0))  # the fault strikes requests under way
        in_flight = done["started"] - done["n"]
        fault = stack.inject(kind, rng)
        fault.at -= began
        fault.in_flight = in_flight
        fault.slots_back_seconds = observer.slots_back()
        injected.append(fault)
        print(f"fault {i + 1}: {fault.kind} ({fault.target}) at {fault.at:.0f} s", file=sys.stderr)
    with lock:
        allowed[0] = requests
        lock.notify_all()
    for thread in threads:
        thread.join(REQUEST_TIMEOUT * requests)
    load_seconds = time.monotonic() - began
    stack.wait_settled(180)
    observer.stop()
    return report(stack, plan, injected, observer, tier_of, load_seconds)
