"""The billing tests' Stripe: a Stripe-compatible server of their own, one per module."""

import pytest

from billing.settings import StripeSettings
from harness.stripe_server import FakeStripe


@pytest.fixture(scope="module")
def fake():
    server = FakeStripe().start()
    yield server
    server.stop()


def relay_settings(fake: FakeStripe, database_url: str, **overrides) -> StripeSettings:
    """The relay's settings against `fake`, answers awaited briefly, a failed event retried
    at the next pass (backoff has its own test)."""
    given = {
        "database_url": database_url,
        "stripe_api_key": "sk_test_gpuhost",
        "stripe_api_base": fake.url,
        "stripe_timeout_seconds": 1.0,
        "relay_batch_size": 500,
        "relay_backoff_base_seconds": 0,
    }
    return StripeSettings(**given | overrides)
