"""Files (`/v1/files`) through the official `openai` client, unchanged: upload, list (pages,
order, purpose), retrieve, content, delete; each tenant's own; the plan's bytes; expiry."""

import json
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import openai
import pytest
from sqlalchemy import update

from billing.db import transaction
from billing.files import StoredFile
from config.plans import DEFAULT_PLANS
from harness.helpers import auth
from harness.processes import wait_for
from storage import file_key
from tests.conftest import running_gateway

BATCH_LINE = b'{"custom_id": "a", "method": "POST", "url": "/v1/chat/completions", "body": {}}\n'


def client(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def stored_path(stack_env, tenant_id, file_id: str) -> Path:
    return Path(stack_env["GPUHOST_STORAGE_URL"]) / file_key(tenant_id, file_id)


def test_a_file_is_kept_read_back_and_deleted(gateway, tenant_factory, stack_env):
    tenant_id, key, _ = tenant_factory.create("pro")
    files = client(gateway, key).files
    content = BATCH_LINE * 3
    made = files.create(file=("requests.jsonl", content), purpose="batch")
    assert made.object == "file" and made.id.startswith("file-")
    assert (made.bytes, made.filename, made.purpose) == (len(content), "requests.jsonl", "batch")
    assert abs(made.created_at - time.time()) < 300  # integer Unix seconds, now
    # kept GPUHOST_FILE_RETENTION_SECONDS at most (30 days by default)
    assert made.expires_at == made.created_at + 30 * 24 * 3600
    assert files.retrieve(made.id) == made
    assert files.content(made.id).read() == content
    assert made.id in [f.id for f in files.list()]
    assert stored_path(stack_env, tenant_id, made.id).read_bytes() == content
    deleted = files.delete(made.id)
    assert (deleted.id, deleted.deleted) == (made.id, True)
    with pytest.raises(openai.NotFoundError, match=made.id):
        files.retrieve(made.id)
    with pytest.raises(openai.NotFoundError):
        files.content(made.id)
    assert not stored_path(stack_env, tenant_id, made.id).exists()


def test_a_tenant_sees_only_its_own_files(gateway, tenant_factory):
    _, owner_key, _ = tenant_factory.create("pro")
    _, other_key, _ = tenant_factory.create("pro")
    mine = client(gateway, owner_key).files
    made = mine.create(file=("mine.txt", b"secret"), purpose="user_data")
    other = client(gateway, other_key).files
    for read in (other.retrieve, other.content, other.delete):
        with pytest.raises(openai.NotFoundError):
            read(made.id)
    assert made.id not in [f.id for f in other.list()]
    assert mine.content(made.id).read() == b"secret"


def test_lists_come_in_pages_in_either_order_by_purpose(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    files = client(gateway, key).files
    made = [
        files.create(file=(f"f{n}.jsonl", BATCH_LINE), purpose="batch" if n % 2 else "user_data")
        for n in range(5)
    ]
    ids = [f.id for f in made]
    first = files.list(limit=2)
    assert [f.id for f in first.data] == ids[::-1][:2] and first.has_more is True
    assert [f.id for f in files.list(limit=2)] == ids[::-1]  # the client follows the pages
    assert [f.id for f in files.list(limit=3, order="asc")] == ids
    assert [f.id for f in files.list(purpose="batch", order="asc")] == ids[1::2]
    raw = httpx.get(f"{gateway.url}/v1/files?limit=2&order=asc", headers=auth(key)).json()
    assert (raw["object"], raw["first_id"], raw["last_id"]) == ("list", ids[0], ids[1])
    with pytest.raises(openai.NotFoundError, match="after"):
        files.list(after="file-gone")


def test_bad_uploads_are_named_and_leave_nothing(gateway, tenant_factory, stack_env):
    tenant_id, key, _ = tenant_factory.create("pro")
    files = client(gateway, key).files
    with pytest.raises(openai.BadRequestError, match="'purpose': 'vision' is not one of"):
        files.create(file=("a.png", b"x"), purpose="vision")
    with pytest.raises(openai.BadRequestError, match="within 3600"):
        files.create(
            file=("a.jsonl", BATCH_LINE),
            purpose="batch",
            expires_after={"anchor": "created_at", "seconds": 60},
        )
    asked = files.create(
        file=("a.jsonl", BATCH_LINE),
        purpose="batch",
        expires_after={"anchor": "created_at", "seconds": 7200},
    )
    assert asked.expires_at == asked.created_at + 7200
    kept = stored_path(stack_env, tenant_id, "x").parent
    assert [p.name for p in kept.iterdir()] == [asked.id]


def tight_plans(file_bytes: int) -> str:
    plans = {tier: plan.model_dump(mode="json") for tier, plan in DEFAULT_PLANS.items()}
    plans["free"]["file_bytes"] = file_bytes
    return json.dumps(plans)


@pytest.fixture(scope="module")
def tight_gateway(stack_env, tmp_path_factory):
    """Free keeps 1,000 bytes of files; an upload is at most 4,000 bytes; expired files are
    swept every 0.2 s."""
    env = stack_env | {
        "GPUHOST_PLANS": tight_plans(1000),
        "GPUHOST_MAX_UPLOAD_BYTES": "4000",
        "GPUHOST_FILE_SWEEP_SECONDS": "0.2",
    }
    yield from running_gateway("gateway-tight-files", env, tmp_path_factory)


def test_a_plan_keeps_its_bytes_of_files_even_for_uploads_at_once(
    tight_gateway, tenant_factory, stack_env
):
    tenant_id, key, _ = tenant_factory.create("free")
    files = client(tight_gateway, key).files
    with pytest.raises(openai.APIStatusError, match="larger than the limit of 4000") as too_big:
        files.create(file=("big.bin", b"x" * 5000), purpose="user_data")
    assert too_big.value.status_code == 413
    kept = files.create(file=("a.bin", b"x" * 600), purpose="user_data")
    with pytest.raises(
        openai.APIStatusError, match="keeps 1,000 bytes of files; 600 bytes are kept"
    ) as over:
        files.create(file=("b.bin", b"x" * 600), purpose="user_data")
    assert over.value.status_code == 413
    files.delete(kept.id)
    # two uploads at once, each of which fits alone: one is kept
    outcomes: list = []

    def upload(name: str) -> None:
        try:
            outcomes.append(files.create(file=(name, b"y" * 600), purpose="user_data"))
        except openai.APIStatusError as exc:
            outcomes.append(exc.status_code)

    threads = [threading.Thread(target=upload, args=(f"c{n}.bin",)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(o if isinstance(o, int) else 200 for o in outcomes) == [200, 413], outcomes
    (won,) = [o for o in outcomes if not isinstance(o, int)]
    folder = stored_path(stack_env, tenant_id, "x").parent
    assert [p.name for p in folder.iterdir()] == [won.id]  # the refused one left no bytes


def test_an_expired_file_is_gone_at_once_and_its_bytes_soon(
    tight_gateway, tenant_factory, sessions, stack_env
):
    tenant_id, key, _ = tenant_factory.create("free")
    files = client(tight_gateway, key).files
    made = files.create(file=("old.jsonl", BATCH_LINE), purpose="batch")
    with transaction(sessions) as session:
        session.execute(
            update(StoredFile)
            .where(StoredFile.id == made.id)
            .values(expires_at=datetime.now(UTC) - timedelta(seconds=1))
        )
    with pytest.raises(openai.NotFoundError):
        files.retrieve(made.id)
    assert made.id not in [f.id for f in files.list()]
    path = stored_path(stack_env, tenant_id, made.id)
    wait_for(lambda: not path.exists(), 30, "the sweep to remove the expired file's bytes")
    with sessions() as session:
        assert session.get(StoredFile, made.id) is None
    # and it no longer counts against the plan's bytes
    files.create(file=("new.bin", b"z" * 900), purpose="user_data")
