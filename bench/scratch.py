"""A scratch stack for a benchmark: a fresh, migrated database of its own on the local
PostgreSQL and a flushed Redis database of the local server (harness/services.py), both gone
afterwards."""

import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import redis

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import migrations  # noqa: E402
from harness.services import drop_database, fresh_database, redis_url  # noqa: E402


@contextmanager
def scratch_stack(name: str, redis_db: int) -> Iterator[tuple[str, str]]:
    """(database URL, Redis URL) of a stack used by this benchmark only, for the block."""
    database = f"gpuhost_bench_{name}_{uuid.uuid4().hex[:8]}"
    url = fresh_database(database)
    scratch_redis = redis_url(redis_db)
    redis.Redis.from_url(scratch_redis).flushdb()
    try:
        migrations.upgrade(url)
        yield url, scratch_redis
    finally:
        redis.Redis.from_url(scratch_redis).flushdb()
        drop_database(database)
