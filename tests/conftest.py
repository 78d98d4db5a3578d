"""Fixtures: a migrated PostgreSQL database, a Redis database, tiny models, real processes.

Everything talks to real services: PostgreSQL and Redis (the machine's, started by .ci/run
when not running, or with GPUHOST_TEST_EMBEDDED=1 the ones `gpuhost dev` ships:
harness/services.py), and `gpuhost worker` / `gpuhost serve` processes.
"""

import fcntl
import os
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import redis

import migrations
from billing import tenants
from billing.db import session_factory, sync_engine, transaction
from harness.processes import Gateway, Worker
from harness.proxy import TcpProxy
from harness.services import TIERS, drop_database, fresh_database, postgres_address
from harness.services import redis_url as redis_url_of

WEBHOOK_SECRET = "whsec_gpuhost_tests"
EVENTS_SECRET = "whsec_gpuhost_tests_thin_events"  # Stripe's event destination (thin events)
ADMIN_TOKEN = "adm_gpuhost_tests_5e3f0b7c91d24a6e8f13"


def _worker_index() -> int:
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    return int(worker.removeprefix("gw") or 0)


SLOTS = 7
_slot: list = []  # (slot number, its open lock file), once taken


def run_slot() -> int:
    """This test session's slot among the Redis databases 1-7 (0 is left to others), so that
    two runs on one machine (a developer's and CI's) never share keys, whose workers would take
    each other's jobs: the first slot whose lock file no other live session holds (an flock,
    released when the process ends, however it ends)."""
    if not _slot:
        for number in range(SLOTS):
            path = Path(tempfile.gettempdir()) / f"gpuhost-test-slot-{number}.lock"
            handle = path.open("a")
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                handle.close()
                continue
            _slot.append((number, handle))
            break
        else:
            raise RuntimeError(f"all {SLOTS} test slots are taken by other test sessions")
    return _slot[0][0]


def redis_database(offset: int) -> int:
    """Databases 1-7 for the main stack, 8-14 for the worker-loss stack, by run slot."""
    return 1 + offset * SLOTS + run_slot()


def apart(stack_env: dict[str, str]) -> dict[str, str]:
    """The stack's settings with a Redis database of its own (emptied) for a module's own
    gateway and workers: its jobs go to its workers only, none to the session's."""
    url = stack_env["GPUHOST_REDIS_URL"].rsplit("/", 1)[0] + f"/{redis_database(1)}"
    redis.Redis.from_url(url).flushdb()
    return stack_env | {"GPUHOST_REDIS_URL": url}


def stack_apart(
    name: str, env: dict[str, str], tmp_path_factory, worker_env: dict[str, str] | None = None
) -> Iterator[tuple]:
    """A gateway and a worker on `env` (`apart`'s; the worker on `worker_env` if given),
    ready, for as long as the generator runs (a module fixture yields from it): (gateway,
    worker)."""
    logs = tmp_path_factory.mktemp(f"{name}-logs")
    gateway = Gateway(f"gateway-{name}", env, logs)
    worker = Worker(f"worker-{name}", worker_env or env, logs, env["GPUHOST_REDIS_URL"])
    try:
        gateway.wait_ready()
        worker.wait_ready()
        yield gateway, worker
    finally:
        worker.stop()
        gateway.stop()


@pytest.fixture(scope="session")
def database_url() -> str:
    name = f"gpuhost_test_{os.getpid()}_{_worker_index()}"
    url = fresh_database(name)
    migrations.upgrade(url)
    yield url
    drop_database(name)


@pytest.fixture(scope="session")
def sessions(database_url):
    engine = sync_engine(database_url)
    yield session_factory(engine)
    engine.dispose()


@pytest.fixture
def db(sessions) -> Iterator:
    """A session whose work is rolled back at the end of the test."""
    with sessions() as session:
        session.begin()
        yield session
        session.rollback()


@pytest.fixture(scope="session")
def redis_url() -> str:
    url = redis_url_of(redis_database(0))
    redis.Redis.from_url(url).flushdb()
    return url


@pytest.fixture(scope="session")
def redis_client(redis_url) -> redis.Redis:
    return redis.Redis.from_url(redis_url)


@pytest.fixture(scope="session")
def models_dir(tmp_path_factory) -> Path:
    from workers.tiny import make_all

    directory = tmp_path_factory.mktemp("models")
    make_all(directory, "llava-llama3", "stable-diffusion")
    return directory


@pytest.fixture(scope="session")
def stack_env(database_url, redis_url, models_dir, tmp_path_factory) -> dict[str, str]:
    return {
        "GPUHOST_STORAGE_URL": str(tmp_path_factory.mktemp("storage")),
        # short, for the tests of lost training jobs; not so short that a step or a pick-up
        # slowed by a busy 2-core machine reads as a lost worker (a second attempt)
        "GPUHOST_TRAIN_STALE_SECONDS": "6",
        # the tests' webhook receivers listen on loopback; retries come quickly
        "GPUHOST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8",  # a list setting, in its short form
        "GPUHOST_WEBHOOK_BACKOFF_BASE_SECONDS": "0.2",
        "GPUHOST_WEBHOOK_MAX_ATTEMPTS": "3",
        "GPUHOST_DATABASE_URL": database_url,
        "GPUHOST_REDIS_URL": redis_url,
        "GPUHOST_MODELS_DIR": str(models_dir),
        "GPUHOST_AUTH_CACHE_SECONDS": "1",
        "GPUHOST_LEASE_TTL_SECONDS": "5",
        "GPUHOST_QUEUE_TIMEOUT_SECONDS": "60",
        "GPUHOST_RESUME_GRACE_SECONDS": "1",
        "GPUHOST_STRIPE_WEBHOOK_SECRET": WEBHOOK_SECRET,
        "GPUHOST_STRIPE_EVENTS_SECRET": EVENTS_SECRET,
        "GPUHOST_ADMIN_TOKEN": ADMIN_TOKEN,
        # the suite sends many bad credentials from one address on purpose; the throttle has
        # its own gateway in tests/api/test_guards.py
        "GPUHOST_CREDENTIAL_FAILURES_LIMIT": "0",
        # refusals at once, as most tests expect; tests/api/test_admission_queue.py waits
        "GPUHOST_ADMISSION_WAIT_SECONDS": "0",
    }


@pytest.fixture(scope="session")
def worker(stack_env, redis_url, tmp_path_factory) -> Iterator[Worker]:
    process = Worker("worker", stack_env, tmp_path_factory.mktemp("logs"), redis_url)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def sd_worker(stack_env, redis_url, tmp_path_factory) -> Iterator[Worker]:
    """A Stable Diffusion worker (queue sd) on the same stack."""
    process = Worker("sd-worker", stack_env, tmp_path_factory.mktemp("logs"), redis_url, "sd")
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def running_gateway(name, stack_env, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway process, ready, for as long as the generator runs (a fixture yields from it)."""
    process = Gateway(name, stack_env, tmp_path_factory.mktemp("logs"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture(scope="session")
def gateway(stack_env, tmp_path_factory) -> Iterator[Gateway]:
    yield from running_gateway("gateway", stack_env, tmp_path_factory)


@pytest.fixture(scope="session")
def second_gateway(stack_env, tmp_path_factory) -> Iterator[Gateway]:
    """Another replica over the same Redis and PostgreSQL."""
    yield from running_gateway("gateway-2", stack_env, tmp_path_factory)


class Tenants:
    """Makes committed tenants and keys (the gateway and workers must see them)."""

    def __init__(self, sessions):
        self.sessions = sessions

    def create(
        self, tier: str = "free", scopes=tenants.DEFAULT_SCOPES
    ) -> tuple[uuid.UUID, str, uuid.UUID]:
        """Returns (tenant id, API key, key id)."""
        with transaction(self.sessions) as session:
            tenant = tenants.create_tenant(session, f"t-{uuid.uuid4().hex[:8]}", tier, TIERS)
            row, secret = tenants.create_key(session, tenant.id, tuple(scopes))
            return tenant.id, secret, row.id


@pytest.fixture(scope="session")
def tenant_factory(sessions) -> Tenants:
    return Tenants(sessions)


@pytest.fixture(scope="module")
def pg_partition(database_url) -> Iterator[TcpProxy]:
    """A TCP proxy to the tests' PostgreSQL that a test can cut and restore: a process given
    `database_url_through(pg_partition)` loses the database while the others keep it."""
    proxy = TcpProxy(postgres_address(database_url))
    yield proxy
    proxy.close()


# Fixtures that reach PostgreSQL or Redis: a test that uses one (itself or through another
# fixture) is marked `services`, and `make test-embedded` runs those again on the servers
# `gpuhost dev` ships. A test that starts servers of its own marks itself.
SERVICE_FIXTURES = {"database_url", "redis_url"}


def pytest_collection_modifyitems(items) -> None:
    for item in items:
        if SERVICE_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.services)
