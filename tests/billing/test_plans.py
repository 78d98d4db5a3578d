"""Plans, periods and balances; the outbox row that goes with each billable usage record."""

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from sqlalchemy import select

from billing import tenants, usage
from billing.models import OutboxEvent
from billing.plans import Balance, period_of
from config.plans import DEFAULT_PLANS
from harness.helpers import record_usage

TIERS = {"free": 1, "pro": 3, "max": 10}


class TestPeriods:
    def test_calendar_months_in_utc(self):
        period = period_of(datetime(2026, 12, 31, 23, 59, tzinfo=UTC))
        assert period.start == datetime(2026, 12, 1, tzinfo=UTC)
        assert period.end == datetime(2027, 1, 1, tzinfo=UTC)
        assert period_of(datetime(2026, 3, 1, tzinfo=UTC)).end == datetime(2026, 4, 1, tzinfo=UTC)


class TestBalance:
    def test_free_stops_at_its_allowance_paid_plans_go_into_overage(self):
        period = period_of(datetime.now(UTC))
        free, pro = DEFAULT_PLANS["free"], DEFAULT_PLANS["pro"]
        assert not Balance(free, period, free.included_gpu_seconds - 1).exhausted
        assert Balance(free, period, free.included_gpu_seconds).exhausted
        over = Balance(pro, period, pro.included_gpu_seconds + 1000)
        assert not over.exhausted
        assert over.overage_usd == (Decimal(1000) * pro.overage_usd_per_gpu_second).quantize(
            Decimal("0.01")
        )
        assert over.remaining_gpu_seconds == 0


def record(session, tenant_id, seconds: float, request_id: str | None = None) -> bool:
    return record_usage(
        session, tenant_id, seconds, request_id, datetime.now(UTC) - timedelta(seconds=1)
    )


class TestOutbox:
    def test_a_billable_record_brings_its_outbox_row_in_milli_gpu_seconds(self, db):
        tenant = tenants.create_tenant(db, "acme", "pro", TIERS)
        request_id = uuid.uuid4().hex
        assert record(db, tenant.id, 1.23456, request_id)
        assert not record(db, tenant.id, 9.0, request_id)  # a second delivery adds nothing
        [row] = db.scalars(select(OutboxEvent).where(OutboxEvent.tenant_id == tenant.id)).all()
        assert row.quantity == 1235 and row.sent_at is None

    def test_nothing_to_bill_means_no_outbox_row(self, db):
        tenant = tenants.create_tenant(db, "acme", "pro", TIERS)
        assert record(db, tenant.id, 0.0)
        assert db.scalars(select(OutboxEvent).where(OutboxEvent.tenant_id == tenant.id)).all() == []

    def test_rounding_to_milli_seconds(self):
        assert [usage.milli(x) for x in (0.0, 0.0004, 0.0005, 1.9999)] == [0, 0, 1, 2000]
