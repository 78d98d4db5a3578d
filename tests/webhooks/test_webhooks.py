"""Job webhooks end to end: events delivered signed with the tenant's secret, retried until
the receiver takes them (or given up), every attempt recorded, bad targets refused."""

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest
from standardwebhooks import Webhook, WebhookVerificationError

from harness.helpers import auth
from harness.processes import wait_for
from tests.conftest import running_gateway
from workers.keyspace import HOOKED, job_record_key


class Receiver:
    """A webhook receiver on loopback: records what it gets, answers the statuses queued."""

    def __init__(self):
        self.received: list[tuple[dict, bytes]] = []
        self.answers: list[int] = []
        outer = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 (http.server's name)
                body = self.rfile.read(int(self.headers["content-length"]))
                outer.received.append(({k.lower(): v for k, v in self.headers.items()}, body))
                self.send_response(outer.answers.pop(0) if outer.answers else 200)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/gpuhost"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.server.shutdown()


@pytest.fixture
def receiver() -> Iterator[Receiver]:
    listening = Receiver()
    yield listening
    listening.close()


def chat_job(url: str, events: list[str]) -> dict:
    return {
        "type": "chat",
        "input": {
            "model": "llava-llama3",
            "messages": [{"role": "user", "content": "Say hi."}],
            "max_tokens": 3,
        },
        "webhook": {"url": url, "events": events},
    }


def deliveries(gateway, key: str, job_id: str) -> list[dict]:
    answer = httpx.get(f"{gateway.url}/v1/jobs/{job_id}/webhooks", headers=auth(key))
    assert answer.status_code == 200, answer.text
    return answer.json()["data"]


def settled(gateway, key: str, job_id: str, count: int) -> list[dict]:
    return wait_for(
        lambda: (
            len(found := deliveries(gateway, key, job_id)) == count
            and all(d["status"] != "pending" for d in found)
            and found
        ),
        60,
        f"{count} webhook deliveries to settle",
        interval=0.1,
    )


def test_start_and_completed_are_delivered_signed(gateway, worker, tenant_factory, receiver):
    _, key, _ = tenant_factory.create("pro")
    secret = httpx.get(f"{gateway.url}/v1/webhooks/secret", headers=auth(key)).json()["key"]
    assert secret.startswith("whsec_")
    made = httpx.post(
        f"{gateway.url}/v1/jobs",
        json=chat_job(receiver.url, ["start", "completed"]),
        headers=auth(key),
    )
    assert made.status_code in (200, 202), made.text
    job_id = made.json()["id"]
    sent = settled(gateway, key, job_id, 2)
    assert [(d["event"], d["status"], d["attempts"]) for d in sent] == [
        ("start", "delivered", 1),
        ("completed", "delivered", 1),
    ]
    events = []
    for headers, body in receiver.received:
        payload = Webhook(secret).verify(body, headers)  # raises unless signed with the secret
        assert headers["webhook-id"] in {d["id"] for d in sent}
        events.append(payload)
        with pytest.raises(WebhookVerificationError):
            Webhook("whsec_" + "A" * 43).verify(body, headers)
        with pytest.raises(WebhookVerificationError):
            Webhook(secret).verify(body.replace(b"job.", b"jab."), headers)
    by_type = {event["type"]: event["data"] for event in events}
    assert set(by_type) == {"job.start", "job.completed"}
    assert by_type["job.completed"]["id"] == job_id
    assert by_type["job.completed"]["status"] == "succeeded"
    assert by_type["job.completed"]["gpu_seconds"] > 0

    rotated = httpx.post(f"{gateway.url}/v1/webhooks/secret/rotate", headers=auth(key)).json()
    assert rotated["key"] != secret and rotated["key"].startswith("whsec_")


def test_a_failing_receiver_is_retried_then_given_up(gateway, worker, tenant_factory, receiver):
    _, key, _ = tenant_factory.create("pro")
    receiver.answers = [500, 503]  # then 200
    first = httpx.post(
        f"{gateway.url}/v1/jobs", json=chat_job(receiver.url, ["completed"]), headers=auth(key)
    ).json()["id"]
    [delivery] = settled(gateway, key, first, 1)
    assert delivery["status"] == "delivered" and delivery["attempts"] == 3
    assert [json.loads(body)["type"] for _, body in receiver.received] == ["job.completed"] * 3
    ids = {headers["webhook-id"] for headers, _ in receiver.received}
    assert ids == {delivery["id"]}  # one message, retried: receivers dedupe on its id

    receiver.answers = [500] * 10
    second = httpx.post(
        f"{gateway.url}/v1/jobs", json=chat_job(receiver.url, ["completed"]), headers=auth(key)
    ).json()["id"]
    [given_up] = settled(gateway, key, second, 1)
    assert given_up["status"] == "failed" and given_up["attempts"] == 3  # the stack's maximum
    assert given_up["last_status_code"] == 500 and given_up["last_error"] == "HTTP 500"


@pytest.mark.parametrize(
    "url",
    [
        "http://10.1.2.3/hook",
        "http://169.254.169.254/latest/meta-data",
        "http://[::1]:8080/hook",
        "gopher://example.com/",
    ],
)
def test_a_webhook_to_a_refused_address_refuses_the_job(gateway, tenant_factory, url):
    _, key, _ = tenant_factory.create("pro")
    answer = httpx.post(
        f"{gateway.url}/v1/jobs", json=chat_job(url, ["completed"]), headers=auth(key)
    )
    assert answer.status_code == 400, answer.text
    assert "webhook.url" in answer.text
    assert httpx.get(f"{gateway.url}/v1/jobs", headers=auth(key)).json()["data"] == []


def test_another_tenant_sees_no_deliveries(gateway, worker, tenant_factory, receiver):
    _, mine, _ = tenant_factory.create("pro")
    _, theirs, _ = tenant_factory.create("pro")
    job_id = httpx.post(
        f"{gateway.url}/v1/jobs", json=chat_job(receiver.url, ["completed"]), headers=auth(mine)
    ).json()["id"]
    settled(gateway, mine, job_id, 1)
    stranger = httpx.get(f"{gateway.url}/v1/jobs/{job_id}/webhooks", headers=auth(theirs))
    assert stranger.status_code == 404
    mine_secret = httpx.get(f"{gateway.url}/v1/webhooks/secret", headers=auth(mine)).json()
    theirs_secret = httpx.get(f"{gateway.url}/v1/webhooks/secret", headers=auth(theirs)).json()
    assert mine_secret != theirs_secret


def test_a_broken_job_record_does_not_stop_other_jobs_webhooks(
    gateway, worker, tenant_factory, receiver, redis_client
):
    broken = "broken-job-record"
    redis_client.hset(job_record_key(broken), mapping={"tenant_id": "not-a-tenant", "type": "chat"})
    redis_client.sadd(HOOKED, broken)
    try:
        _, key, _ = tenant_factory.create("pro")
        job_id = httpx.post(
            f"{gateway.url}/v1/jobs", json=chat_job(receiver.url, ["completed"]), headers=auth(key)
        ).json()["id"]
        [delivery] = settled(gateway, key, job_id, 1)
        assert delivery["status"] == "delivered"
    finally:
        redis_client.srem(HOOKED, broken)
        redis_client.delete(job_record_key(broken))


class SlowReceiver:
    """A receiver that answers its status line, then one header every half second until told
    to stop (`stalling`: set while it trickles), or with a body that never ends (`endless`)."""

    def __init__(self, endless: bool = False):
        self.stalling = threading.Event()
        self.stop = threading.Event()
        outer = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_POST(self):  # noqa: N802 (http.server's name)
                self.rfile.read(int(self.headers["content-length"]))
                self.send_response_only(200)
                try:
                    if endless:
                        self.send_header("Transfer-Encoding", "chunked")
                        self.end_headers()
                        chunk = b"x" * 65536
                        while not outer.stop.is_set():  # 64 KiB chunks, forever
                            self.wfile.write(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                        return
                    outer.stalling.set()
                    while not outer.stop.wait(0.5):
                        self.wfile.write(b"X-Slow: still here\r\n")
                        self.wfile.flush()
                except OSError:
                    pass  # the gateway hung up: as it should
                finally:
                    outer.stalling.clear()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_port}/hooks/slow"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self):
        self.stop.set()
        self.server.shutdown()


@pytest.fixture(scope="module")
def patient_gateway(stack_env, tmp_path_factory):
    """A gateway that gives a webhook receiver a minute to answer."""
    env = stack_env | {"GPUHOST_WEBHOOK_TIMEOUT_SECONDS": "60"}
    yield from running_gateway("gateway-patient-webhooks", env, tmp_path_factory)


@pytest.mark.usefixtures("worker")
def test_a_slow_receiver_delays_only_its_own_tenant(patient_gateway, tenant_factory, receiver):
    """Tenant A's receiver trickles its headers (a header each half second, the answer never
    done); tenant B's webhook, asked for after, is delivered while A's still trickles."""
    slow = SlowReceiver()
    try:
        _, a, _ = tenant_factory.create("pro")
        _, b, _ = tenant_factory.create("pro")
        made = httpx.post(
            f"{patient_gateway.url}/v1/jobs",
            json=chat_job(slow.url, ["completed"]),
            headers=auth(a),
        )
        assert made.status_code in (200, 202), made.text
        assert slow.stalling.wait(60), "A's receiver was never called"
        job_id = httpx.post(
            f"{patient_gateway.url}/v1/jobs",
            json=chat_job(receiver.url, ["completed"]),
            headers=auth(b),
        ).json()["id"]
        [delivery] = settled(patient_gateway, b, job_id, 1)
        assert delivery["status"] == "delivered"
        assert slow.stalling.is_set(), "A's receiver should still be trickling"
    finally:
        slow.close()


@pytest.mark.usefixtures("worker")
def test_a_receivers_answer_is_not_read_whole(patient_gateway, tenant_factory):
    """A receiver answering 200 with a body that never ends: the status is the answer."""
    endless = SlowReceiver(endless=True)
    try:
        _, key, _ = tenant_factory.create("pro")
        job_id = httpx.post(
            f"{patient_gateway.url}/v1/jobs",
            json=chat_job(endless.url, ["completed"]),
            headers=auth(key),
        ).json()["id"]
        [delivery] = settled(patient_gateway, key, job_id, 1)
        assert (delivery["status"], delivery["attempts"]) == ("delivered", 1)
        assert delivery["last_status_code"] == 200
    finally:
        endless.close()
