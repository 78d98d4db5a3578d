"""The fleet's order: which ready job goes next when the workers of its model have room.
Decisions only, no Redis (`api.pipeline.fleet` reads what they decide on and acts on them):

1. a job that has waited longer than the aging bound (GPUHOST_FLEET_AGING_SECONDS), oldest
   first, so that no interactive request is starved while the fleet keeps serving;
2. else the lowest band (`Plan.band`: Max 0, Pro 1, Free 2 by default; batch lines after all);
3. within the band, the tenant that was served the fewest GPU-seconds lately (each tenant's
   served seconds decay with a half-life, GPUHOST_FLEET_FAIR_HALF_LIFE_SECONDS), its running
   jobs counted at what its jobs usually cost, then that tenant's oldest job: a tenant with
   more clients or longer requests does not get more of the fleet.

A job already running is never stopped for another, so a paying tenant's job would still wait
for one to end while free traffic fills every worker. Jobs of the lowest plan band (Free) and
batch lines therefore leave GPUHOST_FLEET_RESERVED_SLOTS of each model's room to the paying
plans' jobs (a model with no more room than that keeps none): a Pro or Max job finds room at
once unless paying jobs fill it.
"""

from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from config.plans import Plan

BATCH_BAND = 1000  # batch lines: after every plan's band, never aged ahead of them
DEFAULT_COST = 1.0  # GPU-seconds a job is taken to cost until its tenant's are known


@dataclass(frozen=True)
class Ready:
    """A job admitted and waiting for room."""

    job_id: str
    tenant: str
    tier: str
    band: int
    arrived: float  # unix time it was offered
    recorded: bool  # an async job or batch line (its record notes when it is sent)


def reserve(plans: Mapping[str, Plan], reserved_slots: int, band: int) -> int:
    """The slots a job of `band` leaves to the paying plans' jobs: those of the lowest plan
    band and batch lines do (none do where every plan shares one band)."""
    bands = [plan.band for plan in plans.values()]
    reserving_from = max(bands) if bands and min(bands) < max(bands) else BATCH_BAND
    return reserved_slots if band >= reserving_from else 0


def open_to(
    entries: dict[str, Ready],
    capacity: bytes | None,
    running: int,
    reserve_of: Callable[[int], int],
) -> dict[str, Ready]:
    """The ready jobs the room left has space for (those that leave slots to the paying
    plans, only while more than those are free); all of them while the room is unknown."""
    if capacity is None:
        return entries
    whole = int(capacity)

    def limit(reserved: int) -> int:  # as FLEET_START counts it
        return whole - reserved if whole > reserved else whole

    return {k: e for k, e in entries.items() if running < limit(reserve_of(e.band))}


def next_job(
    entries: dict[str, Ready],
    running: Counter,
    served: dict[str, float],
    costs: dict[str, float],
    now: float,
    aging: float,
) -> Ready:
    """The job to start next among `entries` (not empty): `running` jobs by tenant, each
    tenant's `served` GPU-seconds (decayed) and what its jobs `costs`; `now` and the `aging`
    bound in seconds."""
    aged = [e for e in entries.values() if e.band < BATCH_BAND and now - e.arrived > aging]
    if aged:
        return min(aged, key=lambda e: e.arrived)
    band = min(e.band for e in entries.values())
    oldest: dict[str, Ready] = {}
    for e in sorted(entries.values(), key=lambda e: e.arrived):
        if e.band == band:
            oldest.setdefault(e.tenant, e)

    def share(e: Ready) -> tuple[float, float]:
        cost = costs.get(e.tenant, costs.get("*", DEFAULT_COST))
        return served.get(e.tenant, 0.0) + running[e.tenant] * cost, e.arrived

    return min(oldest.values(), key=share)


def decayed(raw: Mapping[bytes, bytes], half_life: float, now: float) -> dict[str, float]:
    """Each tenant's recently served GPU-seconds (stored as "seconds:when"), decayed to
    `now`."""
    found = {}
    for tenant, value in raw.items():
        seconds, _, at = value.decode().partition(":")
        found[tenant.decode()] = float(seconds) * 0.5 ** ((now - float(at)) / half_life)
    return found
