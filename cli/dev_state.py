"""What `gpuhost dev` keeps in its state directory besides the servers' data: the lock that
makes the directory one dev stack's, and the demo tenant's key and the operator token, which
the next `gpuhost dev` there uses again. Files holding a secret are readable by their owner
only."""

import fcntl
import json
import os
import secrets
from contextlib import ExitStack
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import select

from billing import tenants
from billing.db import session_factory, sync_engine, transaction
from billing.keys import hash_key
from billing.models import ApiKey

DEMO_TIER = "pro"


def hold(state_dir: Path, stack: ExitStack) -> None:
    """The state directory is this process's while it runs; a second one is refused."""
    lock = (state_dir / "dev.lock").open("a+")
    stack.callback(lock.close)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise RuntimeError(
            f"another gpuhost dev is running on {state_dir}; stop it first (Ctrl-C in its "
            "terminal), or use another --state-dir"
        ) from None
    lock.truncate(0)
    lock.write(str(os.getpid()))
    lock.flush()


def private(path: Path, text: str) -> None:
    """Write a file only its owner can read (it holds keys)."""
    path.touch(mode=0o600, exist_ok=True)
    path.chmod(0o600)
    path.write_text(text)


def demo_key(database_url: str, state_dir: Path, tiers: dict[str, int]) -> tuple[str, str]:
    """The demo tenant and its key: made once, remembered in the state dir, and used again by
    the next `gpuhost dev` there while the key is live (a new one only if it was revoked)."""
    remembered = state_dir / "demo-tenant.json"
    known = json.loads(remembered.read_text()) if remembered.exists() else {}
    engine = sync_engine(database_url)
    try:
        with transaction(session_factory(engine)) as session:
            try:
                tenant = tenants.get_tenant(session, known["id"]) if known.get("id") else None
            except tenants.Unknown:
                tenant = None
            if tenant is None:
                tenant, known = tenants.create_tenant(session, "demo", DEMO_TIER, tiers), {}
            secret = known.get("key")
            row = session.scalar(select(ApiKey).where(ApiKey.key_hash == hash_key(secret or "")))
            live = (
                row is not None
                and row.tenant_id == tenant.id
                and row.revoked_at is None
                and (row.expires_at is None or row.expires_at > datetime.now(UTC))
            )
            if not live:
                _, secret = tenants.create_key(session, tenant.id)
            private(remembered, json.dumps({"id": str(tenant.id), "key": secret}))
            return str(tenant.id), secret
    finally:
        engine.dispose()


def operator_token(state_dir: Path) -> str:
    """The operator token of this state dir (made once; the dashboard's admin sign-in)."""
    path = state_dir / "admin-token"
    if not path.exists():
        private(path, secrets.token_urlsafe(32))
    return path.read_text().strip()
