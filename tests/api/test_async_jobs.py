"""Asynchronous jobs: accepted over the tier's limit and run in turn, waited on or polled,
cancelled, billed once, and another tenant's jobs are not found."""

import json
import threading
import time

import httpx

from harness.helpers import auth, in_flight, usage_rows
from harness.processes import wait_for


def chat(tokens: int, content: str = "Describe a lighthouse.") -> dict:
    return {
        "type": "chat",
        "input": {
            "model": "llava-llama3",
            "messages": [{"role": "user", "content": content}],
            "max_tokens": tokens,
            "temperature": 0,
        },
    }


def post(gateway, key: str, body: dict, wait: int | None = None) -> httpx.Response:
    headers = auth(key) | ({"Prefer": f"wait={wait}"} if wait else {})
    return httpx.post(f"{gateway.url}/v1/jobs", json=body, headers=headers, timeout=90)


def test_a_chat_job_waited_on(gateway, worker, tenant_factory, sessions):
    _, key, _ = tenant_factory.create("pro")
    done = post(gateway, key, chat(6), wait=60)
    assert done.status_code == 200, done.text
    job = done.json()
    assert job["status"] == "succeeded" and job["output"]["completion_tokens"] == 6
    assert job["output"]["text"] and job["gpu_seconds"] > 0
    times = [job[name] for name in ("created_at", "submitted_at", "started_at", "finished_at")]
    assert times == sorted(times) and times[-1] - times[0] < 60, times
    [record] = usage_rows(sessions, job["id"])
    assert record.gpu_seconds == job["gpu_seconds"]
    again = httpx.get(f"{gateway.url}/v1/jobs/{job['id']}", headers=auth(key)).json()
    assert again == job
    listed = httpx.get(f"{gateway.url}/v1/jobs", headers=auth(key)).json()["data"]
    assert [j["id"] for j in listed] == [job["id"]]


def test_a_chat_job_with_logprobs_has_them_in_its_output(gateway, worker, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    body = chat(5)
    body["input"] |= {"logprobs": True, "top_logprobs": 2}
    job = post(gateway, key, body, wait=60).json()
    assert job["status"] == "succeeded", job
    content = job["output"]["logprobs"]["content"]
    assert len(content) == job["output"]["completion_tokens"] == 5
    assert all(len(token["top_logprobs"]) == 2 for token in content)
    assert "logprobs" not in post(gateway, key, chat(2), wait=60).json()["output"]


def test_a_chat_job_that_must_call_a_tool(gateway, worker, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    parameters = {
        "type": "object",
        "properties": {"zone": {"enum": ["UTC", "CET"]}},
        "required": ["zone"],
        "additionalProperties": False,
    }
    body = chat(40)
    body["input"] |= {
        "tools": [{"type": "function", "function": {"name": "now", "parameters": parameters}}],
        "tool_choice": "required",
    }
    job = post(gateway, key, body, wait=60).json()
    assert job["status"] == "succeeded" and job["output"]["finish_reason"] == "tool_calls"
    (call,) = job["output"]["tool_calls"]
    assert call["function"]["name"] == "now"
    assert json.loads(call["function"]["arguments"])["zone"] in ("UTC", "CET")
    again = httpx.get(f"{gateway.url}/v1/jobs/{job['id']}", headers=auth(key)).json()
    assert again == job  # the same call id each time it is read


def test_over_the_limit_jobs_wait_their_turn(gateway, worker, tenant_factory, redis_client):
    tenant_id, key, _ = tenant_factory.create("free")  # one at a time
    peak, sampling = [0], threading.Event()

    def sample():
        while not sampling.is_set():
            peak[0] = max(peak[0], in_flight(redis_client, tenant_id))
            time.sleep(0.02)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    accepted = [post(gateway, key, chat(30)) for _ in range(3)]
    assert [r.status_code for r in accepted] == [202] * 3  # not refused: queued
    ids = [r.json()["id"] for r in accepted]
    finished = [
        httpx.get(
            f"{gateway.url}/v1/jobs/{job_id}", headers=auth(key) | {"Prefer": "wait=60"}, timeout=90
        ).json()
        for job_id in ids
    ]
    sampling.set()
    assert [j["status"] for j in finished] == ["succeeded"] * 3
    assert peak[0] == 1  # never more than the Free tier's one slot
    wait_for(lambda: in_flight(redis_client, tenant_id) == 0, 10, "the slot to come back")


def test_a_waiting_job_cancelled_never_runs(gateway, worker, tenant_factory, sessions):
    _, key, _ = tenant_factory.create("free")
    first = post(gateway, key, chat(400)).json()
    second = post(gateway, key, chat(5)).json()

    def status(job: dict) -> str:
        return httpx.get(f"{gateway.url}/v1/jobs/{job['id']}", headers=auth(key)).json()["status"]

    wait_for(lambda: status(first) == "running", 60, "the first job to start")
    cancelled = httpx.post(
        f"{gateway.url}/v1/jobs/{second['id']}/cancel", headers=auth(key), timeout=30
    ).json()
    assert cancelled["status"] == "cancelled"
    stopped = httpx.post(
        f"{gateway.url}/v1/jobs/{first['id']}/cancel", headers=auth(key), timeout=30
    )
    assert stopped.status_code == 200
    assert status(first) == "cancelled"
    # it ran a while: recorded once, when its worker stopped it
    wait_for(lambda: usage_rows(sessions, first["id"]), 60, "the running job to stop")
    assert len(usage_rows(sessions, first["id"])) == 1
    assert usage_rows(sessions, second["id"]) == []  # it never ran


def test_an_image_job(gateway, sd_worker, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    body = {
        "type": "images",
        "input": {"prompt": "a lighthouse", "width": 64, "height": 64, "num_inference_steps": 3},
    }
    job = post(gateway, key, body, wait=60).json()
    assert job["status"] == "succeeded" and len(job["output"]["images"]) == 1


def test_bad_jobs_are_refused_by_field(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    wrong_type = post(gateway, key, {"type": "video", "input": {}})
    assert wrong_type.status_code == 400  # /v1: OpenAI's error shape
    assert "field 'type'" in wrong_type.json()["error"]["message"]
    bad_input = post(gateway, key, chat(5) | {"input": {"model": "llava-llama3"}})
    assert bad_input.status_code == 400
    assert "field 'input.messages'" in bad_input.json()["error"]["message"]
    several = chat(5)
    several["input"]["n"] = 2
    refused = post(gateway, key, several)
    assert refused.status_code == 400
    assert "field 'input.n': a job gives one answer" in refused.json()["error"]["message"]


def test_another_tenants_job_is_not_found(gateway, worker, tenant_factory):
    _, mine, _ = tenant_factory.create("pro")
    _, theirs, _ = tenant_factory.create("pro")
    job = post(gateway, mine, chat(3), wait=60).json()
    assert httpx.get(f"{gateway.url}/v1/jobs/{job['id']}", headers=auth(theirs)).status_code == 404
    refused = httpx.post(f"{gateway.url}/v1/jobs/{job['id']}/cancel", headers=auth(theirs))
    assert refused.status_code == 404
    assert httpx.get(f"{gateway.url}/v1/jobs", headers=auth(theirs)).json()["data"] == []


def test_the_same_idempotency_key_never_makes_a_second_job(
    gateway, worker, tenant_factory, sessions
):
    _, key, _ = tenant_factory.create("pro")
    headers = auth(key) | {"Idempotency-Key": "order-7731"}
    first = httpx.post(f"{gateway.url}/v1/jobs", json=chat(4), headers=headers, timeout=60)
    again = httpx.post(
        f"{gateway.url}/v1/jobs", json=chat(4), headers=headers | {"Prefer": "wait=60"}, timeout=90
    )
    assert first.status_code == 202 and again.status_code == 200
    assert again.json()["id"] == first.json()["id"]
    assert again.json()["status"] == "succeeded"
    assert len(usage_rows(sessions, first.json()["id"])) == 1  # run and billed once
    other = httpx.post(f"{gateway.url}/v1/jobs", json=chat(9), headers=headers, timeout=60)
    assert other.status_code == 409
    assert "Idempotency-Key was used with a different request" in other.json()["error"]["message"]
    _, someone_else, _ = tenant_factory.create("pro")  # keys are per tenant
    theirs = httpx.post(
        f"{gateway.url}/v1/jobs",
        json=chat(4),
        headers=auth(someone_else) | {"Idempotency-Key": "order-7731"},
        timeout=60,
    )
    assert theirs.status_code == 202 and theirs.json()["id"] != first.json()["id"]


def test_a_refused_request_claims_no_idempotency_key(gateway, worker, tenant_factory):
    """Only an accepted request claims its key: after a 404 or 400, the corrected request may
    use the same key."""
    _, key, _ = tenant_factory.create("pro")
    headers = auth(key) | {"Idempotency-Key": "order-refused-first"}
    unknown_model = {"type": "chat", "input": chat(3)["input"] | {"model": "no-such-model"}}
    refused = httpx.post(f"{gateway.url}/v1/jobs", json=unknown_model, headers=headers)
    assert refused.status_code == 404, refused.text
    bad = {"type": "chat", "input": chat(3)["input"] | {"max_tokens": -5}}
    assert httpx.post(f"{gateway.url}/v1/jobs", json=bad, headers=headers).status_code == 400
    accepted = httpx.post(
        f"{gateway.url}/v1/jobs", json=chat(3), headers=headers | {"Prefer": "wait=60"}, timeout=90
    )
    assert accepted.status_code == 200, accepted.text
    assert accepted.json()["status"] == "succeeded"
