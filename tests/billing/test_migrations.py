"""Migrations go up and down cleanly on PostgreSQL."""

import os

import pytest
from sqlalchemy import create_engine, inspect

import migrations
from tests.conftest import drop_database, fresh_database

TABLES = {"tenants", "api_keys", "usage_records", "billing_outbox"}


@pytest.fixture
def scratch_url():
    name = f"gpuhost_test_migrations_{os.getpid()}"
    yield fresh_database(name)
    drop_database(name)


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade(scratch_url):
    migrations.upgrade(scratch_url)
    assert tables(scratch_url) >= TABLES
    migrations.downgrade(scratch_url, "base")
    assert tables(scratch_url) == {"alembic_version"}
    migrations.upgrade(scratch_url)
    assert tables(scratch_url) >= TABLES


def test_usage_request_id_is_unique(scratch_url):
    migrations.upgrade(scratch_url)
    engine = create_engine(scratch_url)
    try:
        uniques = inspect(engine).get_unique_constraints("usage_records")
    finally:
        engine.dispose()
    assert ["request_id"] in [u["column_names"] for u in uniques]
