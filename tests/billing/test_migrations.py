"""Migrations go up and down cleanly on PostgreSQL."""

import contextlib
import os
import uuid
from collections.abc import Iterator

import pytest
from sqlalchemy import Engine, create_engine, inspect, text

import migrations
from harness.services import drop_database, fresh_database

pytestmark = pytest.mark.services  # servers of its own: gpuhost dev's too, embedded

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


@contextlib.contextmanager
def at_revision(url: str, revision: str) -> Iterator[tuple[Engine, uuid.UUID]]:
    """The schema as of `revision`, with one tenant in it: (an engine, the tenant's id)."""
    migrations.upgrade(url, revision)
    engine = create_engine(url)
    tenant = uuid.uuid4()
    try:
        with engine.begin() as connection:
            connection.execute(
                text("INSERT INTO tenants (id, name, tier) VALUES (:id, 'old', 'pro')"),
                {"id": tenant},
            )
        yield engine, tenant
    finally:
        engine.dispose()


def test_cancelled_fine_tunes_are_spelt_one_way_after_0011(scratch_url):
    with at_revision(scratch_url, "0010") as (engine, tenant):
        with engine.begin() as connection:
            for job, status in (("ft-a", "canceled"), ("ft-b", "succeeded")):
                connection.execute(
                    text(
                        "INSERT INTO fine_tunes (id, tenant_id, model, status, params, dataset_key,"
                        " dataset_images, dataset_bytes, step, checkpoint_step, gpu_seconds,"
                        " attempts, cancel_requested) VALUES (:id, :tenant, 'sd', :status, '{}',"
                        " 'k', 1, 1, 0, 0, 0, 0, false)"
                    ),
                    {"id": job, "tenant": tenant, "status": status},
                )
        migrations.upgrade(scratch_url)
        with engine.connect() as connection:
            statuses = dict(connection.execute(text("SELECT id, status FROM fine_tunes")).all())
        assert statuses == {"ft-a": "cancelled", "ft-b": "succeeded"}


def test_keys_that_held_every_scope_keep_managing_keys_after_0013(scratch_url):
    with at_revision(scratch_url, "0012") as (engine, tenant):
        with engine.begin() as connection:
            for n, scopes in enumerate((["inference", "usage:read"], ["usage:read"])):
                connection.execute(
                    text(
                        "INSERT INTO api_keys (id, tenant_id, key_hash, prefix, last_four, scopes)"
                        " VALUES (:id, :tenant, :hash, 'gph_abcd', 'wxyz', :scopes)"
                    ),
                    {"id": uuid.uuid4(), "tenant": tenant, "hash": f"h{n}", "scopes": scopes},
                )
        migrations.upgrade(scratch_url)
        with engine.connect() as connection:
            found = sorted(
                sorted(row[0]) for row in connection.execute(text("SELECT scopes FROM api_keys"))
            )
        assert found == [["inference", "keys:write", "usage:read"], ["usage:read"]]
