"""Quotas at admission (402, tier changes), and the tenant's usage and balance APIs."""

import uuid
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import httpx
import pytest
from sqlalchemy import update

from billing import tenants
from billing.db import transaction
from billing.models import UsageRecord
from billing.plans import period_of
from config.plans import DEFAULT_PLANS
from harness.helpers import auth, chat_body, ndjson, record_usage

pytestmark = pytest.mark.usefixtures("worker")


def spend(sessions, tenant_id, seconds: float, when: datetime) -> str:
    request_id = uuid.uuid4().hex
    with transaction(sessions) as session:
        record_usage(session, tenant_id, seconds, request_id, when, 10, 5)
    return request_id


def ask(gateway, key) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/api/chat",
        json=chat_body(num_predict=2) | {"stream": False},
        headers=auth(key),
        timeout=60,
    )


class TestQuota:
    def test_free_over_its_allowance_gets_402_until_the_period_rolls(
        self, gateway, tenant_factory, sessions
    ):
        tenant_id, key, _ = tenant_factory.create("free")
        allowance = DEFAULT_PLANS["free"].included_gpu_seconds
        spent = spend(sessions, tenant_id, allowance, datetime.now(UTC))
        refused = ask(gateway, key)
        assert refused.status_code == 402
        renews = period_of(datetime.now(UTC)).end.isoformat()
        assert f"renew at {renews}" in refused.json()["error"]
        # The period rolls: that usage now belongs to the month before.
        last_month = period_of(datetime.now(UTC)).start - timedelta(hours=1)
        with transaction(sessions) as session:
            session.execute(
                update(UsageRecord)
                .where(UsageRecord.request_id == spent)
                .values(finished_at=last_month)
            )
        assert ask(gateway, key).status_code == 200

    def test_paid_plans_go_on_past_their_allowance(self, gateway, tenant_factory, sessions):
        tenant_id, key, _ = tenant_factory.create("pro")
        spend(sessions, tenant_id, DEFAULT_PLANS["pro"].included_gpu_seconds + 5, datetime.now(UTC))
        assert ask(gateway, key).status_code == 200

    def test_a_tier_change_takes_effect_on_the_next_request(
        self, gateway, tenant_factory, sessions
    ):
        tenant_id, key, _ = tenant_factory.create("free")
        with httpx.Client(timeout=60) as client:
            request = client.build_request(
                "POST",
                f"{gateway.url}/api/chat",
                json=chat_body(num_predict=4000),
                headers=auth(key),
            )
            first = client.send(request, stream=True)
            lines = ndjson(first)
            assert next(lines)["done"] is False
            assert ask(gateway, key).status_code == 429
            with transaction(sessions) as session:
                tenants.set_tier(session, str(tenant_id), "pro", {"free": 1, "pro": 3})
            assert ask(gateway, key).status_code == 200  # at once, despite the key cache
            first.close()


class TestUsageApi:
    def test_totals_and_buckets_for_the_tenant_only(self, gateway, tenant_factory, sessions):
        tenant_id, key, _ = tenant_factory.create("pro")
        other_id, _, _ = tenant_factory.create("pro")
        now = datetime.now(UTC)
        spend(sessions, tenant_id, 2.5, now - timedelta(minutes=5))
        spend(sessions, tenant_id, 1.5, now - timedelta(hours=3))
        spend(sessions, tenant_id, 7.0, now - timedelta(days=3))
        spend(sessions, other_id, 100.0, now - timedelta(minutes=5))
        day = httpx.get(
            f"{gateway.url}/api/usage", params={"range": "24h"}, headers=auth(key), timeout=30
        ).json()
        assert day["unit"] == "hour"
        assert day["totals"]["gpu_seconds"] == pytest.approx(4.0)
        assert day["totals"]["requests"] == 2 and len(day["buckets"]) == 2
        week = httpx.get(
            f"{gateway.url}/api/usage", params={"range": "7d"}, headers=auth(key), timeout=30
        ).json()
        assert week["unit"] == "day" and week["totals"]["gpu_seconds"] == pytest.approx(11.0)
        # all of it within the Pro allowance: nothing beyond the monthly price
        assert week["totals"]["cost_usd"] == "0.0000"
        assert {bucket["cost_usd"] for bucket in week["buckets"]} == {"0.0000"}

    def test_seconds_beyond_the_allowance_cost_what_the_invoice_says(
        self, gateway, tenant_factory, sessions
    ):
        tenant_id, key, _ = tenant_factory.create("pro")
        plan = DEFAULT_PLANS["pro"]
        now = datetime.now(UTC)
        spend(sessions, tenant_id, plan.included_gpu_seconds - 5, now)
        spend(sessions, tenant_id, 15.0, now)  # 10 of its 15 seconds beyond the allowance
        day = httpx.get(
            f"{gateway.url}/api/usage", params={"range": "24h"}, headers=auth(key), timeout=30
        ).json()
        beyond = 10 * plan.overage_usd_per_gpu_second
        assert Decimal(day["totals"]["cost_usd"]) == beyond
        balance = httpx.get(f"{gateway.url}/api/balance", headers=auth(key), timeout=30).json()
        assert Decimal(balance["overage_usd"]) == beyond.quantize(Decimal("0.01"))
        assert Decimal(balance["total_usd"]) == plan.monthly_price_usd + Decimal(
            balance["overage_usd"]
        )

    def test_a_bad_range_is_a_400(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("pro")
        response = httpx.get(
            f"{gateway.url}/api/usage", params={"range": "1y"}, headers=auth(key), timeout=30
        )
        assert response.status_code == 400 and "field 'range'" in response.json()["error"]

    def test_balance(self, gateway, tenant_factory, sessions):
        tenant_id, key, _ = tenant_factory.create("free")
        spend(sessions, tenant_id, 100.0, datetime.now(UTC))
        balance = httpx.get(f"{gateway.url}/api/balance", headers=auth(key), timeout=30).json()
        assert balance["tier"] == "free" and balance["used_gpu_seconds"] == 100.0
        assert balance["remaining_gpu_seconds"] == DEFAULT_PLANS["free"].included_gpu_seconds - 100
        assert balance["period_end"] == period_of(datetime.now(UTC)).end.isoformat()

    def test_usage_needs_the_usage_read_scope(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("free", scopes=("inference",))
        response = httpx.get(f"{gateway.url}/api/balance", headers=auth(key), timeout=30)
        assert response.status_code == 403 and "'usage:read' scope" in response.json()["error"]
