"""Migrations go up and down cleanly on PostgreSQL."""

from sqlalchemy import create_engine, inspect

import migrations
from tests.conftest import fresh_database

TABLES = {"tenants", "api_keys", "usage_records"}


def tables(url: str) -> set[str]:
    engine = create_engine(url)
    try:
        return set(inspect(engine).get_table_names())
    finally:
        engine.dispose()


def test_upgrade_downgrade_upgrade():
    url = fresh_database("gpuhost_test_migrations")
    migrations.upgrade(url)
    assert tables(url) >= TABLES
    migrations.downgrade(url, "base")
    assert tables(url) == {"alembic_version"}
    migrations.upgrade(url)
    assert tables(url) >= TABLES


def test_usage_request_id_is_unique():
    url = fresh_database("gpuhost_test_migrations")
    migrations.upgrade(url)
    engine = create_engine(url)
    try:
        uniques = inspect(engine).get_unique_constraints("usage_records")
    finally:
        engine.dispose()
    assert ["request_id"] in [u["column_names"] for u in uniques]
