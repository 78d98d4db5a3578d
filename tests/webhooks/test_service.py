"""Webhook deliveries keep the exact body they are signed over, whatever text it holds."""

import json

import pytest

from billing.db import async_engine, async_session_factory
from webhooks import service


@pytest.fixture
async def async_sessions(database_url):
    engine = async_engine(database_url)
    yield async_session_factory(engine)
    await engine.dispose()


async def test_a_body_with_a_nul_character_is_kept_as_sent(async_sessions, tenant_factory):
    tenant_id, _, _ = tenant_factory.create("pro")
    payload = {"type": "job.completed", "data": {"output": {"text": "a\x00b\u2603"}}}
    async with async_sessions() as session, session.begin():
        await service.record(session, tenant_id, "job-nul", "completed", "https://x.test/", payload)
        await service.record(session, tenant_id, "job-nul", "completed", "https://x.test/", {})
    async with async_sessions() as session, session.begin():
        [delivery] = await service.of_job(session, tenant_id, "job-nul")  # once per event
        assert json.loads(delivery.body) == payload
        assert "\\u0000" in delivery.body
