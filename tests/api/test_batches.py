"""Batches: a JSONL file of requests run as jobs; a bad line is reported on its own result
line and the rest complete; cancel ends it with every line accounted for; another tenant's
batch is not found."""

import json
from collections.abc import Iterator

import httpx
import pytest

from harness.helpers import auth, in_flight, usage_rows
from harness.processes import Gateway, wait_for
from storage import Storage


def chat_line(custom_id: str, tokens: int = 3, openai_form: bool = False) -> dict:
    body = {
        "model": "llava-llama3",
        "messages": [{"role": "user", "content": f"Describe item {custom_id}."}],
        "max_tokens": tokens,
    }
    if openai_form:
        return {
            "custom_id": custom_id,
            "method": "POST",
            "url": "/v1/chat/completions",
            "body": body,
        }
    return {"custom_id": custom_id, "type": "chat", "input": body}


def upload(gateway, key: str, lines: list) -> httpx.Response:
    text = "\n".join(line if isinstance(line, str) else json.dumps(line) for line in lines)
    return httpx.post(
        f"{gateway.url}/v1/batches",
        files={"file": ("requests.jsonl", text.encode(), "application/jsonl")},
        headers=auth(key),
        timeout=60,
    )


def ended(gateway, key: str, batch_id: str) -> dict:
    return wait_for(
        lambda: (
            (view := httpx.get(f"{gateway.url}/v1/batches/{batch_id}", headers=auth(key)).json())[
                "status"
            ]
            in ("completed", "cancelled")
            and view
        ),
        120,
        f"batch {batch_id} to end",
        interval=0.2,
    )


def output(gateway, key: str, batch_id: str) -> list[dict]:
    answer = httpx.get(f"{gateway.url}/v1/batches/{batch_id}/output", headers=auth(key))
    assert answer.status_code == 200, answer.text
    return [json.loads(line) for line in answer.text.splitlines()]


def test_a_bad_line_is_reported_and_the_rest_complete(
    gateway, worker, sd_worker, tenant_factory, sessions
):
    _, key, _ = tenant_factory.create("pro")
    lines = [
        chat_line("a"),
        "{this is not json",
        chat_line("b", openai_form=True),
        {
            "custom_id": "c",
            "type": "chat",
            "input": {"model": "no-such-model", "messages": [{"role": "user", "content": "hi"}]},
        },
        {
            "custom_id": "d",
            "type": "images",
            "input": {
                "prompt": "a lighthouse",
                "width": 64,
                "height": 64,
                "num_inference_steps": 2,
            },
        },
        {"custom_id": "e", "type": "images", "input": {"prompt": "x", "width": 65}},
    ]
    made = upload(gateway, key, lines)
    assert made.status_code == 201, made.text
    assert made.json()["request_counts"]["total"] == 6
    batch_id = made.json()["id"]
    early = httpx.get(f"{gateway.url}/v1/batches/{batch_id}/output", headers=auth(key))
    assert early.status_code in (200, 409)  # 409 until it ends (it may already have)

    view = ended(gateway, key, batch_id)
    assert view["status"] == "completed"
    assert view["request_counts"] == {"total": 6, "completed": 3, "failed": 3}
    results = output(gateway, key, batch_id)
    assert [r["custom_id"] for r in results] == ["a", None, "b", "c", "d", "e"]
    for good in (results[0], results[2], results[4]):
        assert good["error"] is None and good["response"]["status_code"] == 200
        assert good["response"]["request_id"] == good["id"]
    for job_form in (results[0], results[4]):
        [record] = usage_rows(sessions, job_form["id"])
        assert record.gpu_seconds == job_form["response"]["body"]["gpu_seconds"]
    # a line in OpenAI's form is answered as its endpoint answers: a chat.completion
    [record] = usage_rows(sessions, results[2]["id"])
    completion = results[2]["response"]["body"]
    assert completion["object"] == "chat.completion"
    assert completion["usage"]["gpu_seconds"] == round(record.gpu_seconds, 6)
    assert results[0]["response"]["body"]["output"]["completion_tokens"] == 3
    assert len(results[4]["response"]["body"]["output"]["images"]) == 1
    assert results[1]["error"]["message"].startswith("line 2: not JSON")
    assert "line 4" in results[3]["error"]["message"]
    assert "no-such-model" in results[3]["error"]["message"]
    assert "line 6: field 'input.width'" in results[5]["error"]["message"]
    assert all(r["response"] is None for r in (results[1], results[3], results[5]))


def test_cancel_ends_the_batch_with_every_line_accounted_for(
    gateway, worker, tenant_factory, redis_client
):
    tenant_id, key, _ = tenant_factory.create("free")  # one line at a time
    made = upload(gateway, key, [chat_line(str(i), tokens=40) for i in range(12)])
    batch_id = made.json()["id"]
    wait_for(
        lambda: (
            httpx.get(f"{gateway.url}/v1/batches/{batch_id}", headers=auth(key)).json()[
                "request_counts"
            ]["completed"]
            >= 1
        ),
        60,
        "a first line to complete",
    )
    cancelled = httpx.post(f"{gateway.url}/v1/batches/{batch_id}/cancel", headers=auth(key))
    assert cancelled.status_code == 200 and cancelled.json()["status"] in (
        "cancelling",
        "cancelled",
    )
    view = ended(gateway, key, batch_id)
    assert view["status"] == "cancelled"
    results = output(gateway, key, batch_id)
    assert [r["custom_id"] for r in results] == [str(i) for i in range(12)]
    assert results[0]["error"] is None
    never = [r for r in results if r["id"] is None]
    assert never and all("cancelled before this line ran" in r["error"]["message"] for r in never)
    counts = view["request_counts"]
    assert counts["completed"] + counts["failed"] == 12
    wait_for(lambda: in_flight(redis_client, tenant_id) == 0, 30, "the slot to come back")


def test_refused_files_and_another_tenant(gateway, worker, tenant_factory):
    _, mine, _ = tenant_factory.create("pro")
    _, theirs, _ = tenant_factory.create("pro")
    for lines, named in (([], "no requests"), ([" "], "no requests")):
        answer = upload(gateway, mine, lines)
        assert answer.status_code == 400 and named in answer.text
    not_text = httpx.post(
        f"{gateway.url}/v1/batches",
        files={"file": ("r.jsonl", b"\xff\xfe\x00", "application/jsonl")},
        headers=auth(mine),
    )
    assert not_text.status_code == 400 and "UTF-8" in not_text.text
    batch_id = upload(gateway, mine, [chat_line("only")]).json()["id"]
    ended(gateway, mine, batch_id)
    for method, path in (
        ("GET", f"/v1/batches/{batch_id}"),
        ("POST", f"/v1/batches/{batch_id}/cancel"),
        ("GET", f"/v1/batches/{batch_id}/output"),
    ):
        answer = httpx.request(method, f"{gateway.url}{path}", headers=auth(theirs))
        assert answer.status_code == 404, (method, path)
    assert httpx.get(f"{gateway.url}/v1/batches", headers=auth(theirs)).json()["data"] == []
    assert [
        b["id"] for b in httpx.get(f"{gateway.url}/v1/batches", headers=auth(mine)).json()["data"]
    ] == [batch_id]


def test_a_large_file_is_read_line_by_line(gateway, worker, tenant_factory):
    """Over 1 MiB (so read from disk, never whole in memory): its line count is checked
    before any line is, and a line that is not UTF-8 is named."""
    _, key, _ = tenant_factory.create("pro")
    padding = "x" * 200
    too_many = [json.dumps(chat_line(f"{i}-{padding}")) for i in range(10_001)]
    answer = upload(gateway, key, too_many)
    assert answer.status_code == 400, answer.text
    assert "10001 lines; the limit is 10000" in answer.text
    bad = "\n".join(too_many[:3]).encode() + b"\n\xff\xfe\n" + "\n".join(too_many[3:9]).encode()
    answer = httpx.post(
        f"{gateway.url}/v1/batches",
        files={"file": ("r.jsonl", bad, "application/jsonl")},
        headers=auth(key),
    )
    assert answer.status_code == 400 and "line 4 is not UTF-8" in answer.text
    lines = [chat_line(f"big-{i}") | {"padding": padding * 300} for i in range(20)]
    batch = upload(gateway, key, lines)  # 1.2 MB: spooled to disk; each line kept
    assert batch.status_code == 201, batch.text
    assert batch.json()["request_counts"]["total"] == 20
    cancelled = httpx.post(
        f"{gateway.url}/v1/batches/{batch.json()['id']}/cancel", headers=auth(key)
    )
    assert cancelled.status_code == 200


@pytest.fixture(scope="module")
def brief_gateway(stack_env, tmp_path_factory) -> Iterator[Gateway]:
    """A gateway that keeps ended batches two seconds."""
    env = stack_env | {"GPUHOST_BATCH_RETENTION_SECONDS": "2"}
    process = Gateway("gateway-brief", env, tmp_path_factory.mktemp("logs"))
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


def test_an_ended_batch_and_its_files_go_after_the_retention(
    brief_gateway, tenant_factory, stack_env
):
    tenant_id, key, _ = tenant_factory.create("pro")
    batch_id = upload(brief_gateway, key, ["not json"]).json()["id"]  # ends at once: one bad line
    ended(brief_gateway, key, batch_id)
    assert [r["error"]["message"] for r in output(brief_gateway, key, batch_id)] == [
        "line 1: not JSON"
    ]
    files = Storage(stack_env["GPUHOST_STORAGE_URL"])
    folder = f"tenants/{tenant_id}/batches/{batch_id}"
    assert files.list(folder) == [f"{folder}/output.jsonl", f"{folder}/specs.jsonl"]
    wait_for(lambda: files.list(folder) == [], 20, "the batch's files to go")
    gone = httpx.get(f"{brief_gateway.url}/v1/batches/{batch_id}", headers=auth(key))
    assert gone.status_code == 404


def test_two_gateways_run_a_batch_once(gateway, second_gateway, worker, tenant_factory, sessions):
    """Every gateway's scheduler advances batches: each line still starts once, and its result
    is counted once."""
    _, key, _ = tenant_factory.create("max")
    lines = [chat_line(str(i), tokens=2) for i in range(16)]
    batch_id = upload(gateway, key, lines).json()["id"]
    view = ended(second_gateway, key, batch_id)
    assert view["request_counts"] == {"total": 16, "completed": 16, "failed": 0}
    results = output(gateway, key, batch_id)
    assert [r["custom_id"] for r in results] == [str(i) for i in range(16)]
    assert [r["id"] for r in results] == [f"{batch_id}-{i}" for i in range(16)]
    for result in results:
        assert len(usage_rows(sessions, result["id"])) == 1
