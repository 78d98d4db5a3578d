"""The `gpuhost` command line: serve, worker, dev, db, admin, models."""

import json
import logging
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Annotated

import typer

from billing import operator, tenants, usage
from billing.db import session_factory, sync_engine, transaction
from billing.settings import ModelSettings, StackSettings

app = typer.Typer(
    help="gpuhost: GPU model hosting, billed by the GPU-second.", no_args_is_help=True
)
db_app = typer.Typer(help="The ledger database.", no_args_is_help=True)
admin_app = typer.Typer(help="Tenants, keys and usage (prints JSON).", no_args_is_help=True)
tenant_app = typer.Typer(help="Tenants.", no_args_is_help=True)
key_app = typer.Typer(help="API keys.", no_args_is_help=True)
usage_app = typer.Typer(help="Usage records.", no_args_is_help=True)
models_app = typer.Typer(help="Model weights.", no_args_is_help=True)
billing_app = typer.Typer(help="Stripe: customers and the usage relay.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(admin_app, name="admin")
app.add_typer(models_app, name="models")
app.add_typer(billing_app, name="billing")
admin_app.add_typer(tenant_app, name="tenant")
admin_app.add_typer(key_app, name="key")
admin_app.add_typer(usage_app, name="usage")


def _print(value: object) -> None:
    typer.echo(json.dumps(value, indent=2, default=str))


def _fail(message: str) -> None:
    typer.echo(json.dumps({"error": message}), err=True)
    raise typer.Exit(1)


def _admin(work):
    """Run `work(session, settings)` in one transaction; admin errors exit 1 with a message."""
    settings = StackSettings()
    engine = sync_engine(settings.database_url)
    try:
        with transaction(session_factory(engine)) as session:
            return work(session, settings)
    except (tenants.NotFound, tenants.InvalidArgument) as exc:
        _fail(str(exc))
    finally:
        engine.dispose()


def _who() -> tuple[str, None]:
    """Who the audit log says made an admin command's change: this machine's user."""
    import getpass

    return f"cli:{getpass.getuser()}", None


def _tenant_json(t) -> dict:
    return {"id": str(t.id), "name": t.name, "tier": t.tier, "created_at": t.created_at}


# -- processes -------------------------------------------------------------------------------


@app.command()
def serve(
    host: Annotated[str | None, typer.Option(help="Address to listen on.")] = None,
    port: Annotated[int | None, typer.Option(help="Port to listen on.")] = None,
    ssl_certfile: Annotated[
        Path | None, typer.Option(help="Serve HTTPS with this PEM certificate (chain).")
    ] = None,
    ssl_keyfile: Annotated[Path | None, typer.Option(help="The certificate's PEM key.")] = None,
) -> None:
    """Run the gateway."""
    import uvicorn

    from api.app import create_app
    from api.settings import GatewaySettings
    from api.tls import check_pair

    settings = GatewaySettings()
    certfile = ssl_certfile or settings.ssl_certfile
    keyfile = ssl_keyfile or settings.ssl_keyfile
    try:
        check_pair(certfile, keyfile)
    except ValueError as exc:
        _fail(str(exc))
    uvicorn.run(
        create_app(settings),
        host=host or settings.listen_host,
        port=port or settings.listen_port,
        log_level="info",
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
    )


@app.command()
def worker(
    queue: Annotated[
        str, typer.Option(help="Queue to consume: llava, sd or train (fine-tuning).")
    ] = "llava",
    concurrency: Annotated[int | None, typer.Option(help="Requests taken at once.")] = None,
) -> None:
    """Run a GPU worker: load the model once, then serve the queue."""
    from workers.main import main as worker_main  # model code: only in the worker process

    worker_main(queue=queue, concurrency=concurrency)


@app.command()
def dev(
    port: Annotated[int, typer.Option(help="Gateway port.")] = 8080,
    state_dir: Annotated[Path, typer.Option(help="Where the embedded services keep state.")] = Path(
        ".gpuhost"
    ),
    tls: Annotated[
        bool, typer.Option("--tls", help="Serve HTTPS with a certificate from a local CA.")
    ] = False,
) -> None:
    """Everything on one box: PostgreSQL, Redis, tiny models, gateway, worker, a demo key."""
    from api.devstack import run_dev

    raise typer.Exit(run_dev(port=port, state_dir=state_dir, tls=tls))


# -- client: talks to a running server (GPUHOST_HOST, GPUHOST_API_KEY) -------------------------


@app.command()
def run(
    model: str,
    prompt: Annotated[str | None, typer.Argument(help="Ask once; omit for a chat.")] = None,
    image: Annotated[list[Path] | None, typer.Option(help="Attach a picture (repeatable).")] = None,
    verbose: Annotated[bool, typer.Option("--verbose", help="Print timings and cost.")] = False,
) -> None:
    """Chat with a model: one question, or an interactive multi-turn chat."""
    from api import client_cli

    try:
        client_cli.run(model, prompt, image, verbose)
    except client_cli.ClientError as exc:
        client_cli.fail(exc)


@app.command()
def ps() -> None:
    """Models loaded on the workers now."""
    from api import client_cli

    try:
        client_cli.ps()
    except client_cli.ClientError as exc:
        client_cli.fail(exc)


@app.command("list")
def list_models() -> None:
    """Models this server offers."""
    from api import client_cli

    try:
        client_cli.list_models()
    except client_cli.ClientError as exc:
        client_cli.fail(exc)


@app.command("usage")
def usage_command(
    limit: Annotated[int, typer.Option(help="Most recent N requests.")] = 20,
) -> None:
    """Your recent requests and the GPU-seconds each cost."""
    from api import client_cli

    try:
        client_cli.usage(limit)
    except client_cli.ClientError as exc:
        client_cli.fail(exc)


@app.command()
def generate(
    prompt: str,
    output: Annotated[Path, typer.Option("-o", "--output", help="PNG file to write.")],
    negative: Annotated[str | None, typer.Option(help="Negative prompt.")] = None,
    steps: Annotated[int | None, typer.Option(help="Inference steps.")] = None,
    seed: Annotated[int | None, typer.Option(help="Seed.")] = None,
    size: Annotated[str | None, typer.Option(help="WIDTHxHEIGHT, e.g. 512x512.")] = None,
) -> None:
    """Make an image with Stable Diffusion."""
    from api import client_cli

    options: dict = {"negative_prompt": negative, "num_inference_steps": steps, "seed": seed}
    if size:
        width, _, height = size.partition("x")
        if not (width.isdigit() and height.isdigit()):
            client_cli.fail(client_cli.ClientError(f"--size {size!r}: expected WIDTHxHEIGHT"))
        options |= {"width": int(width), "height": int(height)}
    try:
        client_cli.generate(prompt, output, {k: v for k, v in options.items() if v is not None})
    except client_cli.ClientError as exc:
        client_cli.fail(exc)


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
    _print(
        _admin(
            lambda s, cfg: _tenant_json(
                operator.create_tenant(s, _who(), name, tier, cfg.tier_limits)
            )
        )
    )


@tenant_app.command("set-tier")
def tenant_set_tier(tenant_id: str, tier: str) -> None:
    """Move a tenant to another tier; takes effect on its next request."""
    _print(
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

    _print(_admin(work))


@key_app.command("revoke")
def key_revoke(key_id: str) -> None:
    """Revoke a key; every gateway refuses it within seconds."""

    def work(session, _):
        row = operator.revoke_key(session, _who(), key_id)
        return {"id": str(row.id), "revoked_at": row.revoked_at}

    _print(_admin(work))


@usage_app.command("list")
def usage_list(
    tenant: Annotated[str, typer.Option(help="Tenant id.")],
    limit: Annotated[int, typer.Option(help="Most recent N records.")] = 100,
) -> None:
    """A tenant's usage records, newest first."""

    def work(session, _):
        found = tenants.get_tenant(session, tenant)
        return [usage.to_dict(r) for r in usage.for_tenant(session, found.id, limit)]

    _print(_admin(work))


# -- billing -----------------------------------------------------------------------------------


def _stripe():
    from billing import stripe_meter
    from billing.settings import StripeSettings

    settings = StripeSettings()
    try:
        api = stripe_meter.client(settings)
    except RuntimeError as exc:
        _fail(str(exc))
    return stripe_meter, settings, api, session_factory(sync_engine(settings.database_url))


@billing_app.command("customers")
def billing_customers() -> None:
    """Create a Stripe customer for every tenant that has none."""
    stripe_meter, _, api, sessions = _stripe()
    _print({"created": stripe_meter.ensure_customers(sessions, api)})


@billing_app.command("setup")
def billing_setup() -> None:
    """Find or make the GPU-seconds meter and every plan's prices in Stripe; print their ids."""
    from billing.relay import Relay

    _, settings, api, sessions = _stripe()
    catalog = Relay(settings, sessions, api).catalog()
    _print({tier: prices.__dict__ for tier, prices in catalog.items()})


@billing_app.command("relay")
def billing_relay(
    once: Annotated[bool, typer.Option("--once", help="One pass, then exit.")] = False,
) -> None:
    """Customers, subscriptions, and usage to Stripe's meter (each record once), until
    stopped. Deployments run `gpuhost billing worker` instead."""
    import time

    from billing.relay import Relay

    _, settings, api, sessions = _stripe()
    relay = Relay(settings, sessions, api)
    while True:
        done = relay.run_pass()
        if done.sent or done.failed or done.customers or done.subscriptions or once:
            _print(done.as_dict())
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
    """Ledger totals against Stripe's meter, per customer; exits 1 on any difference."""
    from billing.plans import period_of

    stripe_meter, settings, api, sessions = _stripe()
    moment = datetime.now(UTC)
    if period:
        try:
            moment = datetime.strptime(period, "%Y-%m").replace(tzinfo=UTC)
        except ValueError:
            _fail(f"--period {period!r}: expected YYYY-MM")
    span = period_of(moment)
    if not settings.stripe_meter_id:  # the meter the relay's event name feeds
        from billing.stripe_catalog import find_meter

        meter_id = find_meter(api, settings)
        if meter_id is None:
            _fail(
                f"no active Stripe meter for events {settings.stripe_meter_event_name!r}: "
                "run `gpuhost billing setup` or set GPUHOST_STRIPE_METER_ID"
            )
        settings = settings.model_copy(update={"stripe_meter_id": meter_id})
    try:
        found = stripe_meter.reconcile(
            sessions, api, settings, span.start, span.end, set(customer) if customer else None
        )
    except RuntimeError as exc:
        _fail(str(exc))
    rows = [d.__dict__ | {"unexplained_milli": d.unexplained} for d in found]
    _print({"period_start": span.start, "period_end": span.end, "customers": rows})
    if any(d.unexplained for d in found):
        raise typer.Exit(1)


# -- models ----------------------------------------------------------------------------------


@models_app.command("make-tiny")
def models_make_tiny(directory: Path) -> None:
    """Write tiny random-weight LLaVA and Stable Diffusion models (for dev and tests)."""
    from workers.tiny import make_all

    settings = ModelSettings()
    made = make_all(directory, settings.llava_model, settings.sd_model)
    _print({name: str(path) for name, path in made.items()})


def main() -> None:
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    app()
