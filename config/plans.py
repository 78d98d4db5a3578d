"""Plans: what each tier includes and costs. Data, with defaults, overridable by settings
(GPUHOST_PLANS); billing's computations over them (periods, balances, prices) are in
`billing.plans`."""

from decimal import Decimal

from pydantic import BaseModel


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
    # Files (/v1/files) a tenant keeps at once, in bytes.
    file_bytes: int = 1024 * 1024 * 1024
    # When the workers are busy, jobs of a lower band start first (fair share between the
    # tenants of one band; batch lines after every band: api/pipeline/fleet.py).
    band: int = 2

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
            band=2,
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
            file_bytes=10 * 1024**3,
            band=1,
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
            file_bytes=100 * 1024**3,
            band=0,
        ),
    )
}
