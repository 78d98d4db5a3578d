"""OpenAI's Batch API through the official `openai` client, unchanged: a file uploaded for a
batch, the batch made from it, polled to its end, its output and error files read back, every
answer parsed as the endpoint's own type; cancel; bad batches named."""

import json
import time

import openai
import pytest
from openai.types import Completion, ImagesResponse
from openai.types.chat import ChatCompletion

from harness.helpers import MODEL, usage_rows
from harness.processes import wait_for
from workers.keyspace import batch_key

ENDED = ("completed", "cancelled", "expired", "failed")


def client(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def request_line(custom_id: str, url: str, body: dict) -> dict:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


def chat(custom_id: str, tokens: int = 3, model: str = MODEL) -> dict:
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Describe item {custom_id}."}],
        "max_tokens": tokens,
    }
    return request_line(custom_id, "/v1/chat/completions", body)


def batch_of(api: openai.OpenAI, endpoint: str, lines: list[dict], **extra):
    text = "\n".join(json.dumps(line) for line in lines).encode()
    kept = api.files.create(file=("requests.jsonl", text), purpose="batch")
    return api.batches.create(
        input_file_id=kept.id, endpoint=endpoint, completion_window="24h", **extra
    )


def ended(api: openai.OpenAI, batch_id: str):
    return wait_for(
        lambda: (batch := api.batches.retrieve(batch_id)).status in ENDED and batch,
        180,
        f"batch {batch_id} to end",
        interval=0.2,
    )


def lines_of(api: openai.OpenAI, file_id: str | None) -> list[dict]:
    if file_id is None:
        return []
    return [json.loads(line) for line in api.files.content(file_id).text.splitlines()]


@pytest.mark.usefixtures("worker")
def test_a_chat_batch_answers_chat_completions_and_files_its_failures(
    gateway, tenant_factory, sessions
):
    _, key, _ = tenant_factory.create("pro")
    api = client(gateway, key)
    lines = [
        chat("a"),
        chat("b", tokens=5),
        chat("c", model="no-such-model"),
        request_line("d", "/v1/completions", {"model": MODEL, "prompt": "x"}),
    ]
    made = batch_of(api, "/v1/chat/completions", lines, metadata={"run": "nightly"})
    assert (made.object, made.endpoint, made.completion_window) == (
        "batch",
        "/v1/chat/completions",
        "24h",
    )
    assert made.status == "in_progress" and made.metadata == {"run": "nightly"}
    assert made.request_counts.total == 4
    assert made.expires_at == made.created_at + 24 * 3600
    batch = ended(api, made.id)
    assert batch.status == "completed"
    assert (batch.request_counts.completed, batch.request_counts.failed) == (2, 2)
    assert batch.completed_at >= batch.finalizing_at >= batch.created_at
    answered = lines_of(api, batch.output_file_id)
    assert [line["custom_id"] for line in answered] == ["a", "b"]
    for line in answered:
        assert line["error"] is None and line["response"]["status_code"] == 200
        completion = ChatCompletion.model_validate(line["response"]["body"])
        assert completion.object == "chat.completion"
        assert completion.choices[0].message.role == "assistant"
        [record] = usage_rows(sessions, line["response"]["request_id"])
        billed = line["response"]["body"]["usage"]["gpu_seconds"]
        assert billed == round(record.gpu_seconds, 6)
    second = ChatCompletion.model_validate(answered[1]["response"]["body"])
    assert second.usage.completion_tokens == 5
    failed = {line["custom_id"]: line for line in lines_of(api, batch.error_file_id)}
    assert set(failed) == {"c", "d"}
    assert "no-such-model" in failed["c"]["error"]["message"]
    assert "this batch's endpoint, /v1/chat/completions" in failed["d"]["error"]["message"]
    assert all(line["response"] is None for line in failed.values())
    # the output files are the tenant's files, of purpose batch_output
    outputs = {f.id: f for f in api.files.list(purpose="batch_output")}
    assert {batch.output_file_id, batch.error_file_id} <= set(outputs)
    assert [b.id for b in api.batches.list()] == [made.id]


@pytest.mark.usefixtures("worker")
def test_a_completions_batch_answers_text_completions(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    api = client(gateway, key)
    body = {"model": MODEL, "prompt": "Once", "max_tokens": 4, "echo": True}
    made = batch_of(api, "/v1/completions", [request_line("x", "/v1/completions", body)])
    batch = ended(api, made.id)
    [line] = lines_of(api, batch.output_file_id)
    completion = Completion.model_validate(line["response"]["body"])
    assert completion.object == "text_completion"
    assert completion.choices[0].text.startswith("Once")
    assert completion.usage.completion_tokens == 4


@pytest.mark.usefixtures("sd_worker")
def test_an_images_batch_answers_images_responses(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    api = client(gateway, key)
    body = {"prompt": "a lighthouse", "size": "64x64", "n": 1}
    url = "/v1/images/generations"
    lines = [
        request_line("img", url, body),
        request_line("as-url", url, body | {"response_format": "url"}),
    ]
    batch = ended(api, batch_of(api, url, lines).id)
    [line] = lines_of(api, batch.output_file_id)
    images = ImagesResponse.model_validate(line["response"]["body"])
    assert len(images.data) == 1 and images.data[0].b64_json
    [refused] = lines_of(api, batch.error_file_id)
    assert "come as b64_json" in refused["error"]["message"]


def under_way(gateway, tenant_factory):
    """A Free tenant's batch of ten long lines (one runs at a time), its first line done."""
    _, key, _ = tenant_factory.create("free")
    api = client(gateway, key)
    made = batch_of(api, "/v1/chat/completions", [chat(str(i), tokens=40) for i in range(10)])
    wait_for(
        lambda: api.batches.retrieve(made.id).request_counts.completed >= 1,
        120,
        "a first line to complete",
    )
    return api, made


@pytest.mark.usefixtures("worker")
def test_cancel_stops_the_lines_not_started_and_bills_none_of_them(
    gateway, tenant_factory, sessions
):
    api, made = under_way(gateway, tenant_factory)
    assert api.batches.cancel(made.id).status in ("cancelling", "cancelled")
    batch = ended(api, made.id)
    assert batch.status == "cancelled" and batch.cancelled_at >= batch.cancelling_at
    answered = lines_of(api, batch.output_file_id)
    failed = lines_of(api, batch.error_file_id)
    assert len(answered) + len(failed) == 10 and answered
    never = [line for line in failed if line["id"] is None]
    assert never == failed, "a line that had started was not let finish"
    assert all(line["error"]["code"] == "batch_cancelled" for line in never)
    # nothing of a line that never ran is billed; each one that ran, once
    for line in answered:
        assert len(usage_rows(sessions, line["response"]["request_id"])) == 1
    for index in {int(line["custom_id"]) for line in never}:
        assert not usage_rows(sessions, f"{made.id}-{index}")


@pytest.mark.usefixtures("worker")
def test_lines_not_started_within_the_window_expire(gateway, tenant_factory, redis_client):
    api, made = under_way(gateway, tenant_factory)
    redis_client.hset(batch_key(made.id), "expires_at", str(time.time() - 1))  # the window ends
    batch = ended(api, made.id)
    assert batch.status == "expired" and batch.expired_at >= batch.created_at
    answered = lines_of(api, batch.output_file_id)
    expired = lines_of(api, batch.error_file_id)
    assert answered and expired and len(answered) + len(expired) == 10
    assert all(line["error"]["code"] == "batch_expired" for line in expired)


def test_bad_batches_are_named(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    _, other_key, _ = tenant_factory.create("pro")
    api = client(gateway, key)
    with pytest.raises(openai.NotFoundError, match="no file 'file-nothing'"):
        api.batches.create(
            input_file_id="file-nothing", endpoint="/v1/chat/completions", completion_window="24h"
        )
    notes = api.files.create(file=("notes.txt", b"{}"), purpose="user_data")
    with pytest.raises(openai.BadRequestError, match="is for user_data, not batch"):
        api.batches.create(
            input_file_id=notes.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    theirs = client(gateway, other_key).files.create(
        file=("r.jsonl", json.dumps(chat("a")).encode()), purpose="batch"
    )
    with pytest.raises(openai.NotFoundError):
        api.batches.create(
            input_file_id=theirs.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
    with pytest.raises(openai.BadRequestError, match="endpoint"):
        api.batches.create(
            input_file_id=theirs.id, endpoint="/v1/embeddings", completion_window="24h"
        )
