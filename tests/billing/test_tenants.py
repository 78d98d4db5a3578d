"""Tenants and keys in the ledger (each test rolled back)."""

import uuid
from datetime import UTC, datetime, timedelta

import pytest
from sqlalchemy import select

from billing import tenants
from billing.models import ApiKey

TIERS = {"free": 1, "pro": 3, "max": 10}


class TestTenants:
    def test_create_and_change_tier(self, db):
        tenant = tenants.create_tenant(db, "acme", "free", TIERS)
        assert tenants.set_tier(db, str(tenant.id), "max", TIERS).tier == "max"

    def test_unknown_tier_is_refused_by_name(self, db):
        with pytest.raises(tenants.InvalidArgument, match="unknown tier 'gold'"):
            tenants.create_tenant(db, "acme", "gold", TIERS)

    @pytest.mark.parametrize("name", ["ac\x00me", "line\nbreak", "\x7f"])
    def test_a_name_with_control_characters_is_refused(self, db, name):
        # PostgreSQL cannot store a NUL in text: refused here, by name, not as a 500 there
        with pytest.raises(tenants.InvalidArgument, match="control characters"):
            tenants.create_tenant(db, name, "free", TIERS)

    def test_a_name_longer_than_its_column_is_refused_by_length(self, db):
        with pytest.raises(tenants.InvalidArgument, match="5000 characters; at most 200"):
            tenants.create_tenant(db, "n" * 5000, "free", TIERS)
        assert tenants.create_tenant(db, "n" * 200, "free", TIERS).name == "n" * 200

    def test_unknown_or_malformed_ids(self, db):
        with pytest.raises(tenants.Unknown):
            tenants.get_tenant(db, str(uuid.uuid4()))
        with pytest.raises(tenants.InvalidArgument, match="not a valid id"):
            tenants.get_tenant(db, "42")


class TestKeys:
    def test_only_the_hash_is_stored(self, db):
        tenant = tenants.create_tenant(db, "acme", "pro", TIERS)
        row, secret = tenants.create_key(db, tenant.id)
        stored = db.scalars(select(ApiKey).where(ApiKey.id == row.id)).one()
        assert secret not in {stored.key_hash, stored.prefix, stored.last_four}
        assert stored.last_four == secret[-4:]
        assert list(stored.scopes) == list(tenants.DEFAULT_SCOPES)

    def test_unknown_scope_is_refused(self, db):
        tenant = tenants.create_tenant(db, "acme", "pro", TIERS)
        with pytest.raises(tenants.InvalidArgument, match="unknown scope"):
            tenants.create_key(db, tenant.id, ("admin",))

    def test_revoke_is_idempotent(self, db):
        tenant = tenants.create_tenant(db, "acme", "pro", TIERS)
        row, _ = tenants.create_key(db, tenant.id)
        first = tenants.revoke_key(db, str(row.id)).revoked_at
        assert tenants.revoke_key(db, str(row.id)).revoked_at == first


class TestLookup:
    async def test_live_revoked_and_expired_keys(self, database_url, sessions):
        from billing.db import async_engine, async_session_factory, transaction

        with transaction(sessions) as session:
            tenant = tenants.create_tenant(session, "lookup", "max", TIERS)
            live, live_secret = tenants.create_key(session, tenant.id)
            _, old_secret = tenants.create_key(
                session, tenant.id, expires_at=datetime.now(UTC) - timedelta(minutes=1)
            )
            gone, gone_secret = tenants.create_key(session, tenant.id)
            tenants.revoke_key(session, str(gone.id))
        engine = async_engine(database_url)
        try:
            async with async_session_factory(engine)() as session, session.begin():
                owner = await tenants.owner_of_key(session, live_secret)
                assert (
                    owner.tenant_id == tenant.id and owner.tier == "max" and owner.key_id == live.id
                )
                assert await tenants.owner_of_key(session, old_secret) is None
                assert await tenants.owner_of_key(session, gone_secret) is None
                assert await tenants.owner_of_key(session, "gph_" + "x" * 30) is None
        finally:
            await engine.dispose()
