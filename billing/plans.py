"""What plans (`config.plans`: what each tier includes and costs) come to: billing periods
and a tenant's balance in one.

Billing periods are calendar months in UTC. GPU-seconds beyond a plan's allowance are billed
at its overage price; a plan without one (Free) stops at its allowance (HTTP 402 until the
next period).
"""

from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

from config.plans import Plan

CENT = Decimal("0.01")


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
