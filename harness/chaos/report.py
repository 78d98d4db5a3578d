"""What the chaos run found (`harness/chaos/load.py`): every answer recorded once, nothing
billed twice, no error billed, no tenant over its tier, the ledger equal to Stripe's meter.
`ok` says whether every invariant held."""

from __future__ import annotations

import json
import time
from collections import Counter, defaultdict
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from billing.models import OutboxEvent, Tenant, UsageRecord
from harness.chaos.stack import FAULT_KINDS, ChaosStack
from harness.services import TIERS
from workers.keyspace import USAGE_PARKED

if TYPE_CHECKING:
    from harness.chaos.load import Exchange, Observer

MILLI = func.floor(UsageRecord.gpu_seconds * 1000 + 0.5)  # what a record bills, as the relay


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


def _error_class(outcome: Exchange) -> str:
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
