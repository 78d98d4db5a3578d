"""Operators' changes from the command line: JSON out, and every change in the audit log
(as through the admin API and the dashboard, which share `billing.operator`)."""

import getpass
import json
import os
import subprocess
import sys

from sqlalchemy import select

from billing.models import AuditEntry, Tenant


def gpuhost(database_url: str, *args: str) -> dict:
    done = subprocess.run(
        [sys.executable, "-m", "cli", "admin", *args],
        env=os.environ | {"GPUHOST_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def test_admin_commands_change_the_ledger_and_are_audited(database_url, sessions):
    tenant = gpuhost(database_url, "tenant", "create", "cli-acme", "--tier", "pro")
    gpuhost(database_url, "tenant", "set-tier", tenant["id"], "max")
    key = gpuhost(database_url, "key", "create", tenant["id"], "--scope", "inference")
    gpuhost(database_url, "key", "revoke", key["id"])
    with sessions() as session:
        assert session.get(Tenant, tenant["id"]).tier == "max"
        entries = session.scalars(
            select(AuditEntry)
            .where(AuditEntry.target.in_([tenant["id"], key["id"]]))
            .order_by(AuditEntry.id)
        ).all()
    assert [e.action for e in entries] == [
        "tenant.create",
        "tenant.set_tier",
        "key.create",
        "key.revoke",
    ]
    assert {e.actor for e in entries} == {f"cli:{getpass.getuser()}"}
    assert entries[1].detail == {"before": "pro", "after": "max"}
    assert key["key"] not in json.dumps([e.detail for e in entries])
    # and listed: the tenant among all, its key (revoked, no secret) among its keys
    assert tenant["id"] in [t["id"] for t in gpuhost(database_url, "tenant", "list")]
    [listed] = gpuhost(database_url, "key", "list", tenant["id"])
    assert listed["id"] == key["id"] and listed["revoked_at"] and "key" not in listed


def test_a_bad_tier_fails_with_its_name_and_audits_nothing(database_url, sessions):
    with sessions() as session:
        before = session.query(AuditEntry).count()
    done = subprocess.run(
        [sys.executable, "-m", "cli", "admin", "tenant", "create", "x", "--tier", "gold"],
        env=os.environ | {"GPUHOST_DATABASE_URL": database_url},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 1 and "unknown tier 'gold'" in done.stderr
    with sessions() as session:
        assert session.query(AuditEntry).count() == before
