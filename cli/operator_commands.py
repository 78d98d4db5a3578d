"""The operator's commands of the `gpuhost` command line: `db`, `admin` (tenants, keys, usage)
and `billing` (Stripe). They work on the ledger directly (GPUHOST_DATABASE_URL) and print JSON.
"""

import json
from datetime import UTC, datetime, timedelta
from typing import Annotated

import redis
import typer

from billing import operator, tenants, usage
from billing.db import session_factory, sync_engine, transaction
from config import StackSettings
from workers.keyspace import KEYS_REVOKED

db_app = typer.Typer(help="The ledger database.", no_args_is_help=True)
admin_app = typer.Typer(help="Tenants, keys and usage (prints JSON).", no_args_is_help=True)
tenant_app = typer.Typer(help="Tenants.", no_args_is_help=True)
key_app = typer.Typer(help="API keys.", no_args_is_help=True)
usage_app = typer.Typer(help="Usage records.", no_args_is_help=True)
billing_app = typer.Typer(help="Stripe: customers and the usage relay.", no_args_is_help=True)
admin_app.add_typer(tenant_app, name="tenant")
admin_app.add_typer(key_app, name="key")
admin_app.add_typer(usage_app, name="usage")


def print_json(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def fail(message: str) -> None:
    typer.echo(json.dumps({"error": message}), err=True)
    raise typer.Exit(1)


def _admin(work):
    """Run `work(session, settings)` in one transaction; admin errors exit 1 with a message."""
    settings = StackSettings()
    engine = sync_engine(settings.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            return work(session, settings)
    except (tenants.Unknown, tenants.InvalidArgument) as exc:
        fail(str(exc))
    finally:
        engine.dispose()


def _who() -> tuple[str, None]:
    """Who the audit log says made an admin command's change: this machine's user."""
    import getpass

    return f"cli:{getpass.getuser()}", None


def _tenant_json(t) -> dict:
    return {"id": str(t.id), "name": t.name, "tier": t.tier, "created_at": t.created_at}


# -- db --------------------------------------------------------------------------------------


@db_app.command("upgrade")
def db_upgrade(revision: str = "head") -> None:
    """Apply migrations up to REVISION (default: the newest)."""
    import migrations

    migrations.upgrade(StackSettings().database_url, revision)
    typer.echo(f"database at {revision}")


@db_app.command("downgrade")
def db_downgrade(revision: str) -> None:
    """Revert migrations down to REVISION ('base' removes every table)."""
    import migrations

    migrations.downgrade(StackSettings().database_url, revision)
    typer.echo(f"database at {revision}")


# -- admin -----------------------------------------------------------------------------------


@tenant_app.command("create")
def tenant_create(
    name: str, tier: Annotated[str, typer.Option(help="free, pro or max.")] = "free"
) -> None:
    """Create a tenant."""
    print_json(
        _admin(
            lambda s, cfg: _tenant_json(
                operator.create_tenant(s, _who(), name, tier, cfg.tier_limits)
            )
        )
    )


@tenant_app.command("list")
def tenant_list() -> None:
    """Every tenant, oldest first."""
    print_json(_admin(lambda s, _: [_tenant_json(t) for t in tenants.all_tenants_sync(s)]))


@tenant_app.command("set-tier")
def tenant_set_tier(tenant_id: str, tier: str) -> None:
    """Move a tenant to another tier: an upgrade applies to its next request, a downgrade
    within GPUHOST_QUOTA_CACHE_SECONDS."""
    print_json(
        _admin(
            lambda s, cfg: _tenant_json(
                operator.set_tier(s, _who(), tenant_id, tier, cfg.tier_limits)
            )
        )
    )


@key_app.command("create")
def key_create(
    tenant_id: str,
    scope: Annotated[list[str] | None, typer.Option(help="Scope (repeatable).")] = None,
    expires_in_days: Annotated[float | None, typer.Option(help="Expire after N days.")] = None,
) -> None:
    """Create an API key. The key is printed once and never stored."""

    def work(session, _):
        expires = datetime.now(UTC) + timedelta(days=expires_in_days) if expires_in_days else None
        scopes = tuple(scope) if scope else tenants.DEFAULT_SCOPES
        row, secret = operator.issue_key(session, _who(), tenant_id, scopes, expires)
        return {
            "id": str(row.id),
            "tenant_id": str(row.tenant_id),
            "key": secret,
            "prefix": row.prefix,
            "last_four": row.last_four,
            "scopes": row.scopes,
            "expires_at": row.expires_at,
        }

    print_json(_admin(work))


@key_app.command("list")
def key_list(tenant_id: str) -> None:
    """A tenant's keys, live and revoked (never their secrets)."""

    def work(session, _):
        found = tenants.get_tenant(session, tenant_id)
        return [
            {
                "id": str(row.id),
                "prefix": row.prefix,
                "last_four": row.last_four,
                "scopes": row.scopes,
                "created_at": row.created_at,
                "expires_at": row.expires_at,
                "revoked_at": row.revoked_at,
                "last_used_at": row.last_used_at,
            }
            for row in tenants.keys_of(session, found.id)
        ]

    print_json(_admin(work))


@key_app.command("revoke")
def key_revoke(key_id: str) -> None:
    """Revoke a key; every gateway refuses it at once (announced through GPUHOST_REDIS_URL)."""

    def work(session, _):
        row = operator.revoke_key(session, _who(), key_id)
        return {"id": str(row.id), "revoked_at": row.revoked_at}

    revoked = _admin(work)
    settings = StackSettings()
    try:
        with redis.Redis.from_url(settings.redis_url, socket_timeout=5) as client:
            client.publish(KEYS_REVOKED, revoked["id"])
    except redis.RedisError as exc:
        typer.echo(
            f"revoked, but not announced to the gateways (Redis: {exc}): each refuses the key "
            "within GPUHOST_AUTH_CACHE_SECONDS, or when it reconnects to Redis",
            err=True,
        )
    print_json(revoked)


@usage_app.command("list")
def usage_list(
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    limit: Annotated[int, typer.Option(help="Most recent N records.")] = 100,
) -> None:
    """A tenant's usage records, newest first."""

    def work(session, _):
        found = tenants.get_tenant(session, tenant)
        return [usage.to_dict(r) for r in usage.for_tenant(session, found.id, limit)]

    print_json(_admin(work))


# -- billing -----------------------------------------------------------------------------------


def _stripe():
    from billing import stripe_meter
    from billing.settings import StripeSettings

    settings = StripeSettings()
    try:
        api = stripe_meter.client(settings)
    except RuntimeError as exc:
        fail(str(exc))
    return stripe_meter, settings, api, session_factory(sync_engine(settings.database_url))


@billing_app.command("customers")
def billing_customers() -> None:
    """Create a Stripe customer for every tenant that has none."""
    stripe_meter, _, api, sessions = _stripe()
    print_json({"created": stripe_meter.ensure_customers(sessions, api)})


@billing_app.command("setup")
def billing_setup() -> None:
    """Find or make the GPU-seconds meter and every plan's prices in Stripe; print their ids."""
    from billing.relay import Relay

    _, settings, api, sessions = _stripe()
    catalog = Relay(settings, sessions, api).catalog()
    print_json({tier: prices.__dict__ for tier, prices in catalog.items()})


@billing_app.command("relay")
def billing_relay(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
) -> None:
    """Customers, subscriptions, and usage to Stripe's meter (each record once), until
    stopped. Deployments run `gpuhost billing worker` instead."""
    import sys
    import time

    from sqlalchemy.exc import DBAPIError

    from billing.relay import Relay

    _, settings, api, sessions = _stripe()
    relay = Relay(settings, sessions, api)
    away = 0  # passes in a row that could not reach the database
    while True:
        try:
            done = relay.run_pass()
        except DBAPIError as exc:  # the ledger is away: nothing was sent that it did not note
            if once:
                fail(f"the database is unreachable: {exc.orig or exc}")
            away += 1
            wait = min(30.0, settings.relay_interval_seconds * 2 ** min(away, 5))
            print(f"relay: the database is unreachable, again in {wait:.0f} s", file=sys.stderr)
            time.sleep(wait)
            continue
        away = 0
        if done.sent or done.failed or done.customers or done.subscriptions or once:
            print_json(done.as_dict())
        if once:
            return
        if not done.sent:
            time.sleep(settings.relay_interval_seconds)


@billing_app.command("worker")
def billing_worker() -> None:
    """The relay as a Celery beat task: a worker on the `billing` queue with beat inside it,
    one relay pass every GPUHOST_RELAY_INTERVAL_SECONDS."""
    from billing.beat import run_billing_worker

    _, settings, _, _ = _stripe()  # fails clearly when Stripe is not configured
    run_billing_worker(settings)


@billing_app.command("reconcile")
def billing_reconcile(
    period: Annotated[str | None, typer.Option(help="YYYY-MM (default: this month).")] = None,
    customer: Annotated[list[str] | None, typer.Option(help="Only these customers.")] = None,
) -> None:
    """Ledger totals against Stripe's meter, per customer, and the meter events Stripe
    reported it could not count; exits 1 on any difference or any such event."""
    from billing.plans import period_of
    from billing.stripe_meter_errors import flagged

    stripe_meter, settings, api, sessions = _stripe()
    moment = datetime.now(UTC)
    if period:
        try:
            moment = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
        except ValueError:
            fail(f"--period {period!r}: expected YYYY-MM")
    span = period_of(moment)
    if not settings.stripe_meter_id:  # the meter the relay's event name feeds
        from billing.stripe_catalog import find_meter

        meter_id = find_meter(api, settings)
        if meter_id is None:
            fail(
                f"no active Stripe meter for events {settings.stripe_meter_event_name!r}: "
                "run `gpuhost billing setup` or set GPUHOST_STRIPE_METER_ID"
            )
        settings = settings.model_copy(update={"stripe_meter_id": meter_id})
    try:
        found = stripe_meter.reconcile(
            sessions, api, settings, span.start, span.end, set(customer) if customer else None
        )
    except RuntimeError as exc:
        fail(str(exc))
    rows = [d.__dict__ | {"unexplained_milli": d.unexplained} for d in found]
    asked = {d.tenant_id for d in found} if customer else None
    with sessions() as session:  # what Stripe took and then reported it could not count
        rejected = [
            r.__dict__
            for r in flagged(session, span.start, span.end)
            if asked is None or r.tenant_id in asked
        ]
    print_json(
        {
            "period_start": span.start,
            "period_end": span.end,
            "customers": rows,
            "rejected_by_stripe": rejected,
        }
    )
    if rejected or any(d.unexplained for d in found):
        raise typer.Exit(1)
