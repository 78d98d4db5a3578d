"""Faults under load, at scale (issue 18): nothing answered goes unrecorded, nothing is
recorded twice, no tenant runs more than its tier, and the ledger equals Stripe's meter.

    python bench/chaos.py [--requests 1000] [--faults 24] [--seed 7] [--json FILE]

The stack (`bench/chaos_stack.py`, all its own): two gateways, two LLaVA workers and one
Stable Diffusion worker on tiny random-weight models, the billing relay, PostgreSQL behind a
TCP proxy, Redis (append-only, as compose runs it), RabbitMQ as the broker, and a
Stripe-compatible server. The load: streamed and non-streamed chats, images and async jobs
from two tenants of each tier (Free / Pro / Max), each sending with one more client than its
tier allows in flight, so that every tenant is sometimes over its limit. The faults, spread
over the run by progress and cycling through the six kinds in a shuffled order: a worker
SIGKILLed (a busy one), a gateway SIGKILLed, Redis restarted (SIGTERM, down for a second),
PostgreSQL unreachable for 5-15 s, the RabbitMQ node SIGKILLed and started again, and the
billing relay killed between Stripe's 2xx and its own commit. A killed process is started
again a second later, as Kubernetes would.

The clients do what a careful client of the API does: a stream cut by its gateway is resumed
on the other one (`GET /api/jobs/{id}/stream?after=N`), an async job is submitted with an
`Idempotency-Key` and sent again with it after a network failure, and a connection refused
goes to the other gateway (what a load balancer does). Prints one JSON report (below); exits
1 if an invariant broke. `tests/chaos/test_chaos_at_scale.py` runs the bounded form in CI.
"""

import argparse
import json
import random
import signal
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import httpx
import redis
from sqlalchemy import func, select

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from bench.chaos_stack import FAULT_KINDS, ChaosStack, FaultDone  # noqa: E402
from billing.models import OutboxEvent, Tenant, UsageRecord  # noqa: E402
from tests.conftest import TIERS  # noqa: E402
from workers.keyspace import USAGE_PARKED, claim_key, slots_key  # noqa: E402

KINDS = {"chat_stream": 0.35, "chat": 0.25, "image": 0.15, "job": 0.25}
REQUEST_TIMEOUT = 180.0
MILLI = func.floor(
    UsageRecord.gpu_seconds * 1000 + 0.5
)  # what a record bills, as the relay  # a request not over by then is hung


@dataclass
class Outcome:
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

    def _call(self, out: Outcome, send, avoid: str | None = None):
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

    def run(self, out: Outcome, key: str, tokens: int) -> None:
        headers = {"Authorization": f"Bearer {key}"}
        try:
            getattr(self, out.kind)(out, headers, tokens)
        except httpx.TimeoutException as exc:
            out.end, out.error = "hung", f"timed out: {exc}"
        except httpx.ConnectError as exc:
            out.end, out.error = "error", f"no gateway: {exc}"

    def chat(self, out: Outcome, headers: dict, tokens: int) -> None:
        body = _chat(tokens) | {"stream": False}

        def send(url: str) -> httpx.Response:
            return httpx.post(f"{url}/api/chat", json=body, headers=headers, timeout=120)

        self._answer(out, send, lambda b: b.get("done") is True)

    def image(self, out: Outcome, headers: dict, tokens: int) -> None:
        body = {"model": "stable-diffusion", "prompt": "a red fox", "num_inference_steps": 2}
        body |= {"width": 64, "height": 64, "seed": tokens}

        def send(url: str) -> httpx.Response:
            return httpx.post(f"{url}/api/images", json=body, headers=headers, timeout=120)

        self._answer(out, send, lambda b: bool(b.get("images")))

    def _answer(self, out: Outcome, send, answered) -> None:
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

    def chat_stream(self, out: Outcome, headers: dict, tokens: int) -> None:
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

    def _resume(self, out: Outcome, headers: dict, lines: list[dict]) -> None:
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

    def job(self, out: Outcome, headers: dict, tokens: int) -> None:
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


def _stream_end(out: Outcome, lines: list[dict]) -> None:
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
        Outcome(i, rng.choice(tenants)[0], rng.choices(kinds, weights)[0]) for i in range(requests)
    ]
    tokens = {o.index: rng.randint(8, 40) for o in plan}
    by_tenant: dict[str, list[Outcome]] = defaultdict(list)
    for outcome in plan:
        by_tenant[outcome.tenant].append(outcome)
    done = Counter()
    lock = threading.Condition()

    def mark(i: int) -> int:
        """Requests that may start before fault i (then the load runs on to the next mark)."""
        return requests if i >= faults else round((i + 1) * requests / (faults + 1))

    allowed = [mark(0)]

    def client_thread(tenant: str, queue: list[Outcome], client: Client) -> None:
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


def report(stack, plan, injected, observer, tier_of, load_seconds) -> dict:
    settled = _settle(stack, observer)
    ids = [o.request_id for o in plan if o.request_id]
    with stack.sessions() as session:
        rows = session.execute(
            select(UsageRecord.request_id, UsageRecord.status, UsageRecord.gpu_seconds).where(
                UsageRecord.request_id.in_(ids)
            )
        ).all()
        doubled = session.scalar(
            select(func.count()).select_from(
                select(UsageRecord.request_id)
                .group_by(UsageRecord.request_id)
                .having(func.count() > 1)
                .subquery()
            )
        )
    records = defaultdict(list)
    for request_id, status, gpu in rows:
        records[request_id].append((status, gpu))
    answered = [o for o in plan if o.end == "answered"]
    unrecorded = [o.index for o in answered if not _billed(records.get(o.request_id))]
    mismatched = [
        o.index
        for o in answered
        if _billed(records.get(o.request_id))
        and abs(records[o.request_id][0][1] - (o.gpu_seconds or 0)) > 1e-6
    ]
    known = set(ids)
    with stack.sessions() as session:  # runs no client learned of (their gateway died)
        unseen = session.execute(
            select(UsageRecord.status, func.count(), func.coalesce(func.sum(MILLI), 0))
            .where(UsageRecord.request_id.not_in(known))
            .group_by(UsageRecord.status)
        ).all()
    errors = [o for o in plan if o.end == "error"]
    errors_billed = [o.index for o in errors if _billed(records.get(o.request_id))]
    lost = [o for o in plan if o.end == "lost"]
    redelivered = _redelivered(stack)
    retried = Counter(r for o in answered for r in set(o.retries) if r != "rerouted")
    retried["redelivered to another worker"] = sum(o.request_id in redelivered for o in answered)
    limits = {t: TIERS[tier] for t, tier in tier_of.items()}
    running_peak, overlapping = _running_peak(
        stack, {t: TIERS[tier] for t, tier in tier_of.items()}
    )
    faults_by_kind = Counter(f.kind for f in injected)
    result = {
        "requests": len(plan),
        "by_kind": dict(Counter(o.kind for o in plan)),
        "tenants": dict(Counter(tier_of.values())),
        "faults": len(injected),
        "faults_by_kind": {k: faults_by_kind[k] for k in FAULT_KINDS},
        "answered": len(answered),
        "retried_transparently": sum(bool(set(o.retries) - {"rerouted"}) for o in answered)
        + retried["redelivered to another worker"],
        "retried_how": dict(retried),
        "clear_errors": len(errors),
        "errors": dict(Counter(_error_class(o) for o in errors).most_common()),
        "lost_with_their_gateway": len(lost),
        "runs_no_client_learned_of": {
            status: {"runs": n, "billed_milli": int(milli)} for status, n, milli in unseen
        },
        "hung": sum(o.end == "hung" for o in plan),
        "answered_but_unrecorded": len(unrecorded),
        "recorded_twice": doubled,
        "recorded_gpu_seconds_differ": len(mismatched),
        "errors_billed": len(errors_billed),
        "peak_in_flight_vs_tier": {
            tier: {
                "tier": TIERS[tier],
                "redis_peak": max(observer.peak[t] for t in tier_of if tier_of[t] == tier),
                "running_peak": max(running_peak[t] for t in tier_of if tier_of[t] == tier),
            }
            for tier in ("free", "pro", "max")
        },
        # the admission invariant: slots held (Redis) never above the tier
        "over_tier": [t for t in tier_of if observer.peak[t] > limits[t]],
        # runs whose ledger times overlap beyond the tier (reported, with examples below)
        "runs_overlapping_over_tier": [t for t in tier_of if running_peak[t] > limits[t]],
        "slots_back_seconds": [
            {"kind": f.kind, "at": round(f.at, 1), "requests_in_flight": f.in_flight}
            | {"seconds": f.slots_back_seconds}
            | f.notes
            for f in injected
        ],
        "load_seconds": round(load_seconds, 1),
        "stripe": settled,
    }
    result["ok"] = ok(result)
    with (stack.workdir / "outcomes.jsonl").open("w") as file:
        for outcome in plan:
            file.write(json.dumps(outcome.__dict__) + "\n")
    result["examples"] = {
        "runs_over_tier": overlapping,
        "unrecorded": unrecorded[:5],
        "errors_billed": errors_billed[:5],
        "hung": [o.index for o in plan if o.end == "hung"][:5],
    }
    return result


def ok(result: dict) -> bool:
    return (
        result["answered_but_unrecorded"] == 0
        and result["recorded_twice"] == 0
        and result["recorded_gpu_seconds_differ"] == 0
        and result["errors_billed"] == 0
        and result["hung"] == 0
        and not result["over_tier"]
        and all(f["seconds"] is not None for f in result["slots_back_seconds"])
        and result["stripe"]["difference_milli"] == 0
        and result["stripe"]["reconcile_exit"] == 0
    )


def _billed(records) -> bool:
    """Whether any of a request's records charges device time: a completed one, or a
    cancelled one that had run (an error the client got is the platform's: neither is due)."""
    return bool(records) and any(gpu > 0 for _, gpu in records)


def _error_class(outcome: Outcome) -> str:
    text = (outcome.error or "").split(":")[0][:60]
    return f"{outcome.status} {text}"


def _redelivered(stack: ChaosStack) -> set[str]:
    """Requests a worker ran after the one running them died before answering (its log)."""
    found = set()
    for log in stack.logs.glob("*.log"):
        for line in log.read_text(errors="replace").splitlines():
            if "was lost before answering; running it" in line:
                found.add(line.split("job ", 1)[1].split(":", 1)[0])
    return found


def _running_peak(stack: ChaosStack, limits: dict[str, int]) -> tuple[dict, dict]:
    """Per tenant, the most requests whose runs (the ledger's start and end) overlapped, and
    for a tenant over its tier, the runs that overlapped (request id, status, start, end)."""
    with stack.sessions() as session:
        rows = session.execute(
            select(
                UsageRecord.tenant_id,
                UsageRecord.request_id,
                UsageRecord.status,
                UsageRecord.started_at,
                UsageRecord.finished_at,
            ).where(UsageRecord.started_at.is_not(None))
        ).all()
    edges = defaultdict(list)
    for tenant, request_id, status, start, end in rows:
        run = (request_id, status, start.isoformat(), end.isoformat())
        edges[str(tenant)] += [(start, 1, run), (end, -1, run)]
    peak = dict.fromkeys(limits, 0)
    over: dict[str, list] = {}
    for tenant, points in edges.items():
        running = set()
        for _, step, run in sorted(points, key=lambda p: (p[0], p[1])):
            (running.add if step > 0 else running.discard)(run)
            peak[tenant] = max(peak.get(tenant, 0), len(running))
            if len(running) > limits.get(tenant, len(running)) and tenant not in over:
                over[tenant] = sorted(running, key=lambda r: r[2])
    return peak, over


def _settle(stack: ChaosStack, observer: Observer) -> dict:
    """Wait for the parked records to reach the ledger and the relay to send everything, then
    reconcile the ledger against Stripe's meter (the CLI, as an operator runs it)."""
    stack_wait = time.monotonic()
    while time.monotonic() - stack_wait < 180:
        with stack.sessions() as session:
            unsent = session.scalar(
                select(func.count()).select_from(OutboxEvent).where(OutboxEvent.sent_at.is_(None))
            )
        parked = stack.redis.hlen(USAGE_PARKED)
        if not unsent and not parked and observer.stale() == 0:
            break
        time.sleep(1)
    with stack.sessions() as session:
        customers = dict(session.execute(select(Tenant.id, Tenant.stripe_customer_id)).all())
        ledger = dict(
            session.execute(
                select(
                    UsageRecord.tenant_id,
                    func.sum(func.floor(UsageRecord.gpu_seconds * 1000 + 0.5)),
                ).group_by(UsageRecord.tenant_id)
            ).all()
        )
    stripe_total = sum(stack.stripe.total(c) for c in customers.values() if c)
    ledger_total = int(sum(ledger.values()))
    months = {datetime.now(UTC).strftime("%Y-%m"), stack.started_month}
    exits, unexplained = [], 0
    for month in sorted(months):
        found = stack.reconcile(month)
        exits.append(found["exit"])
        unexplained += sum(abs(c["unexplained_milli"]) for c in found["customers"])
    return {
        "ledger_milli": ledger_total,
        "stripe_milli": stripe_total,
        "difference_milli": ledger_total - stripe_total,
        "reconcile_exit": max(exits),
        "reconcile_unexplained_milli": unexplained,
        "meter_event_posts": sum(stack.stripe.posts.values()),
        "meter_events": len(stack.stripe.events),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--faults", type=int, default=24)
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--json", type=Path, help="also write the report here")
    parser.add_argument("--keep", type=Path, help="keep the logs and outcomes in this folder")
    args = parser.parse_args()
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # stop the stack on the way out
    if args.keep:
        args.keep.mkdir(parents=True, exist_ok=True)
        result = run(args.keep, args.requests, args.faults, args.seed)
    else:
        with tempfile.TemporaryDirectory(prefix="gpuhost-chaos-") as workdir:
            result = run(Path(workdir), args.requests, args.faults, args.seed)
    text = json.dumps(result, indent=2, default=str)
    print(text)
    if args.json:
        args.json.write_text(text + "\n")
    sys.exit(0 if result["ok"] else 1)


if __name__ == "__main__":
    main()
