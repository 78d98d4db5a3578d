"""Plans: what each tier includes and costs. Data, with defaults, overridable by settings.

Billing periods are calendar months in UTC. GPU-seconds beyond a plan's allowance are billed
at its overage price; a plan without one (Free) stops at its allowance (HTTP 402 until the
next period).
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from pydantic import BaseModel

CENT = Decimal("0.01")


class Plan(BaseModel):
    tier: str
    name: str
    monthly_price_usd: Decimal
    concurrency: int  # requests in flight
    included_gpu_seconds: float  # per billing period
    overage_usd_per_gpu_second: Decimal | None  # None: no overage, the plan stops at its allowance
    # Fine-tuning: jobs queued or running at once, and a dataset's size (uncompressed bytes).
    training_jobs: int = 1
    dataset_bytes: int = 50 * 1024 * 1024

    def overage_usd(self, used_before: float, seconds: float) -> Decimal:
        """What `seconds` GPU-seconds cost beyond the allowance, `used_before` having been used
        in the period already: exact, unrounded (round the sum, not each part). The one price
        computation: the balance, the estimated invoice, /api/usage's costs; Stripe's
        graduated metered price charges the same (the allowance free, then the overage price),
        and, like it, seconds count to the millisecond."""
        price = self.overage_usd_per_gpu_second
        if price is None:
            return Decimal(0)
        included = Decimal(str(self.included_gpu_seconds))
        before = Decimal(str(round(used_before, 3)))
        after = before + Decimal(str(round(seconds, 3)))
        return max(Decimal(0), after - max(before, included)) * price


DEFAULT_PLANS: dict[str, Plan] = {
    plan.tier: plan
    for plan in (
        Plan(
            tier="free",
            name="Free",
            monthly_price_usd=Decimal("0"),
            concurrency=1,
            included_gpu_seconds=600,
            overage_usd_per_gpu_second=None,
        ),
        Plan(
            tier="pro",
            name="Pro",
            monthly_price_usd=Decimal("20"),
            concurrency=3,
            included_gpu_seconds=36_000,
            overage_usd_per_gpu_second=Decimal("0.0006"),
            training_jobs=2,
            dataset_bytes=200 * 1024 * 1024,
        ),
        Plan(
            tier="max",
            name="Max",
            monthly_price_usd=Decimal("100"),
            concurrency=10,
            included_gpu_seconds=360_000,
            overage_usd_per_gpu_second=Decimal("0.0004"),
            training_jobs=4,
            dataset_bytes=1024 * 1024 * 1024,
        ),
    )
}


@dataclass(frozen=True)
class Period:
    start: datetime
    end: datetime  # exclusive: the next period's start


def period_of(moment: datetime) -> Period:
    start = moment.astimezone(UTC).replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = (
        start.replace(year=start.year + 1, month=1)
        if start.month == 12
        else start.replace(month=start.month + 1)
    )
    return Period(start, end)


@dataclass(frozen=True)
class Balance:
    plan: Plan
    period: Period
    used_gpu_seconds: float

    @property
    def remaining_gpu_seconds(self) -> float:
        return max(0.0, self.plan.included_gpu_seconds - self.used_gpu_seconds)

    @property
    def exhausted(self) -> bool:
        """Out of allowance with no overage to fall back on: requests are refused."""
        return (
            self.plan.overage_usd_per_gpu_second is None
            and self.used_gpu_seconds >= self.plan.included_gpu_seconds
        )

    @property
    def overage_usd(self) -> Decimal:
        return self.plan.overage_usd(0.0, self.used_gpu_seconds).quantize(CENT)

    @property
    def total_usd(self) -> Decimal:
        """The period's estimated invoice: the monthly price and the overage."""
        return (self.plan.monthly_price_usd + self.overage_usd).quantize(CENT)

    def to_dict(self) -> dict:
        return {
            "tier": self.plan.tier,
            "plan": self.plan.name,
            "period_start": self.period.start.isoformat(),
            "period_end": self.period.end.isoformat(),
            "included_gpu_seconds": self.plan.included_gpu_seconds,
            "used_gpu_seconds": round(self.used_gpu_seconds, 3),
            "remaining_gpu_seconds": round(self.remaining_gpu_seconds, 3),
            "overage_usd_per_gpu_second": (
                str(self.plan.overage_usd_per_gpu_second)
                if self.plan.overage_usd_per_gpu_second is not None
                else None
            ),
            "overage_usd": str(self.overage_usd),
            "total_usd": str(self.total_usd),
            "monthly_price_usd": str(self.plan.monthly_price_usd),
            "exhausted": self.exhausted,
        }
