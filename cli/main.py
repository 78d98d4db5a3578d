"""The `gpuhost` command line: serve, worker, dev, db, admin, models."""

import logging
import socket
import sys
from pathlib import Path
from typing import Annotated

import typer
from pydantic import ValidationError
from pydantic_settings import SettingsError as SourceError

from cli.operator_commands import admin_app, billing_app, db_app, fail, print_json
from config import ModelSettings, logs, settings_problem

app = typer.Typer(
    help="gpuhost: GPU model hosting, billed by the GPU-second.", no_args_is_help=True
)
models_app = typer.Typer(help="Model weights.", no_args_is_help=True)
app.add_typer(db_app, name="db")
app.add_typer(admin_app, name="admin")
app.add_typer(models_app, name="models")
app.add_typer(billing_app, name="billing")


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
    from api.guards.connections import guarded_protocol
    from api.settings import GatewaySettings
    from cli.tls import check_pair

    settings = GatewaySettings()
    certfile = ssl_certfile or settings.ssl_certfile
    keyfile = ssl_keyfile or settings.ssl_keyfile
    try:
        check_pair(certfile, keyfile)
    except ValueError as exc:
        fail(str(exc))
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=host or settings.listen_host,
        port=port or settings.listen_port,
        log_level="info",
        log_config=None,  # uvicorn's loggers go through the process's handler (config.logs)
        ssl_certfile=str(certfile) if certfile else None,
        ssl_keyfile=str(keyfile) if keyfile else None,
        # X-Forwarded-For and -Proto are believed from the trusted proxies only
        proxy_headers=bool(settings.trusted_proxies),
        forwarded_allow_ips=",".join(settings.trusted_proxies) or None,
        http=guarded_protocol(
            settings.head_timeout_seconds,
            settings.connections_per_client,
            settings.trusted_proxies,
            app.state.metrics.connections,
        ),
    )
    sockets = [config.bind_socket()]
    if settings.metrics_port:  # the same server, on a port of its own for /metrics
        sockets.append(socket.create_server((config.host, settings.metrics_port)))
    uvicorn.Server(config).run(sockets=sockets)


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
    from cli.devstack import run_dev

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
    from cli import client

    try:
        client.run(model, prompt, image, verbose)
    except client.ClientError as exc:
        client.fail(exc)


@app.command()
def ps() -> None:
    """Models loaded on the workers now."""
    from cli import client

    try:
        client.ps()
    except client.ClientError as exc:
        client.fail(exc)


@app.command("list")
def list_models() -> None:
    """Models this server offers."""
    from cli import client

    try:
        client.list_models()
    except client.ClientError as exc:
        client.fail(exc)


@app.command("usage")
def usage_command(
    limit: Annotated[int, typer.Option(help="Most recent N requests.")] = 20,
) -> None:
    """Your recent requests and the GPU-seconds each cost."""
    from cli import client

    try:
        client.usage(limit)
    except client.ClientError as exc:
        client.fail(exc)


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
    from cli import client

    options: dict = {"negative_prompt": negative, "num_inference_steps": steps, "seed": seed}
    if size:
        width, _, height = size.partition("x")
        if not (width.isdigit() and height.isdigit()):
            client.fail(client.ClientError(f"--size {size!r}: expected WIDTHxHEIGHT"))
        options |= {"width": int(width), "height": int(height)}
    try:
        client.generate(prompt, output, {k: v for k, v in options.items() if v is not None})
    except client.ClientError as exc:
        client.fail(exc)


# -- models ----------------------------------------------------------------------------------


@models_app.command("make-tiny")
def models_make_tiny(directory: Path) -> None:
    """Write tiny random-weight LLaVA and Stable Diffusion models (for dev and tests)."""
    from workers.tiny import make_all

    settings = ModelSettings()
    made = make_all(directory, settings.llava_model, settings.sd_model)
    print_json({name: str(path) for name, path in made.items()})


def main() -> None:
    try:
        logs.configure()  # GPUHOST_LOG_FORMAT: text, or json lines
        # the HTTP client's line per request: only with `run --verbose`
        for library in ("httpx", "httpcore"):
            logging.getLogger(library).setLevel(logging.WARNING)
        app()
    except (ValidationError, SourceError) as exc:
        problem = settings_problem(exc)
        if problem is None:
            raise
        for line in problem.splitlines():
            print(f"gpuhost: bad setting {line}", file=sys.stderr)
        sys.exit(2)
