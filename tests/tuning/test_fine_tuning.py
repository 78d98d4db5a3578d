"""Fine-tuning end to end, on tiny Stable Diffusion through real train and sd workers: the
loss goes down, the adapter changes images, a killed worker's job resumes from its checkpoint
and every step is billed once, cancel stops and bills what ran, and another tenant can read,
cancel or use none of it."""

import base64
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
from sqlalchemy import select

from harness.helpers import auth, usage_rows
from harness.processes import Worker, wait_for
from storage import Storage
from tests.tuning.datasets import picture, striped, zipped
from tuning.models import FineTuneSegment
from workers.contract import TRAIN_QUEUE

FINISHED = ("succeeded", "failed", "cancelled")


class TrainWorkers:
    """Train workers for this module; a test may kill one and start another."""

    def __init__(self, env, broker, log_dir):
        self.env, self.broker, self.log_dir = env, broker, log_dir
        self.started: list[Worker] = []

    def start(self) -> Worker:
        name = f"train-worker-{len(self.started)}"
        process = Worker(name, self.env, self.log_dir, self.broker, "train")
        self.started.append(process)
        process.wait_ready()
        return process

    def stop_all(self) -> None:
        for process in self.started:
            process.stop()


@pytest.fixture(scope="module")
def trainers(stack_env, redis_url, tmp_path_factory) -> Iterator[TrainWorkers]:
    workers = TrainWorkers(stack_env, redis_url, tmp_path_factory.mktemp("train-logs"))
    workers.start()
    try:
        yield workers
    finally:
        workers.stop_all()


def create(gateway, key: str, data: bytes, **params) -> httpx.Response:
    return httpx.post(
        f"{gateway.url}/v1/fine_tuning/jobs",
        files={"dataset": ("pictures.zip", data, "application/zip")},
        data={name: str(value) for name, value in params.items()},
        headers=auth(key),
        timeout=60,
    )


def job(gateway, key: str, job_id: str) -> dict:
    answer = httpx.get(f"{gateway.url}/v1/fine_tuning/jobs/{job_id}", headers=auth(key))
    assert answer.status_code == 200, answer.text
    return answer.json()


def finished(gateway, key: str, job_id: str, timeout: float = 180) -> dict:
    return wait_for(
        lambda: (view := job(gateway, key, job_id))["status"] in FINISHED and view,
        timeout,
        f"fine-tune {job_id} to finish",
        interval=0.2,
    )


def image(gateway, key: str, **fields) -> httpx.Response:
    body = {"prompt": "a striped picture", "width": 64, "height": 64, "seed": 7} | fields
    body |= {"num_inference_steps": 4}
    return httpx.post(f"{gateway.url}/api/images", json=body, headers=auth(key), timeout=120)


def segments(sessions, job_id: str) -> list[FineTuneSegment]:
    with sessions() as session:
        return list(
            session.scalars(
                select(FineTuneSegment)
                .where(FineTuneSegment.fine_tune_id == job_id)
                .order_by(FineTuneSegment.from_step)
            )
        )


def stored(stack_env, tenant_id) -> list[str]:
    """What storage holds for the tenant, by kind and name."""
    prefix = f"tenants/{tenant_id}/"
    keys = Storage(stack_env["GPUHOST_STORAGE_URL"]).list(prefix.rstrip("/"))
    return [key.removeprefix(prefix) for key in keys]


def assert_billed_once(sessions, view: dict) -> None:
    """The segments tile the steps run, no step twice; one usage record, their sum."""
    kept = segments(sessions, view["id"])
    assert [s.from_step for s in kept] == [0] + [s.to_step for s in kept[:-1]]
    assert kept[-1].to_step == view["checkpoint_step"]
    [record] = usage_rows(sessions, view["id"])
    assert record.kind == "fine_tune"
    assert record.gpu_seconds == pytest.approx(sum(s.gpu_seconds for s in kept))
    assert record.gpu_seconds == pytest.approx(view["gpu_seconds"])


def test_training_lowers_the_loss_and_the_adapter_changes_images(
    gateway, sd_worker, trainers, tenant_factory, sessions, stack_env
):
    tenant_id, key, _ = tenant_factory.create("pro")
    made = create(
        gateway, key, striped(4), steps=120, checkpoint_every=40, learning_rate=1e-3, rank=4
    )
    assert made.status_code == 201, made.text
    assert made.json()["status"] == "queued" and made.json()["dataset"]["images"] == 4
    view = finished(gateway, key, made.json()["id"])
    assert view["status"] == "succeeded", view
    assert view["progress"]["step"] == 120 and view["attempts"] == 1
    losses = [checkpoint["loss"] for checkpoint in view["checkpoints"]]
    assert [c["step"] for c in view["checkpoints"]] == [40, 80, 120]
    assert losses[-1] < losses[0], losses
    assert_billed_once(sessions, view)

    adapter_id = view["adapter_id"]
    # the dataset and the checkpoints went with the run: only the adapter is kept
    assert stored(stack_env, tenant_id) == [f"adapters/{adapter_id}.safetensors"]
    listed = httpx.get(f"{gateway.url}/v1/adapters", headers=auth(key)).json()["data"]
    assert [a["id"] for a in listed] == [adapter_id] and listed[0]["rank"] == 4
    content = httpx.get(f"{gateway.url}/v1/adapters/{adapter_id}/content", headers=auth(key))
    assert content.status_code == 200 and content.content[8:9] == b"{"  # a safetensors header

    plain = image(gateway, key)
    adapted = image(gateway, key, lora=adapter_id)
    weightless = image(gateway, key, lora=adapter_id, lora_weight=0)
    for answer in (plain, adapted, weightless):
        assert answer.status_code == 200, answer.text
    assert adapted.json()["images"] != plain.json()["images"]
    assert weightless.json()["images"] == plain.json()["images"]

    deleted = httpx.delete(f"{gateway.url}/v1/adapters/{adapter_id}", headers=auth(key))
    assert deleted.status_code == 200 and deleted.json()["deleted"] is True
    gone = image(gateway, key, lora=adapter_id)
    assert gone.status_code == 404 and "lora" in gone.text
    assert httpx.get(f"{gateway.url}/v1/adapters", headers=auth(key)).json()["data"] == []
    assert stored(stack_env, tenant_id) == []


def upload(gateway, key: str, data: bytes, purpose: str) -> str:
    kept = httpx.post(
        f"{gateway.url}/v1/files",
        files={"file": ("pictures.zip", data, "application/zip")},
        data={"purpose": purpose},
        headers=auth(key),
    )
    assert kept.status_code == 200, kept.text
    return kept.json()["id"]


def test_a_job_trains_on_a_file_uploaded_for_fine_tuning(gateway, trainers, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    file_id = upload(gateway, key, striped(2), "fine-tune")
    made = httpx.post(
        f"{gateway.url}/v1/fine_tuning/jobs",
        data={"training_file": file_id, "steps": "4"},
        headers=auth(key),
        timeout=60,
    )
    assert made.status_code == 201, made.text
    assert made.json()["dataset"]["images"] == 2
    assert finished(gateway, key, made.json()["id"])["status"] == "succeeded"


def test_a_killed_worker_s_job_resumes_from_its_checkpoint_billed_once(
    gateway, trainers, tenant_factory, sessions
):
    _, key, _ = tenant_factory.create("pro")
    made = create(gateway, key, striped(3), steps=300, checkpoint_every=50, learning_rate=1e-3)
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]
    wait_for(
        lambda: job(gateway, key, job_id)["checkpoint_step"] >= 50,
        120,
        "a first checkpoint",
        interval=0.1,
    )
    victim = trainers.started[-1]
    victim.stop(signal.SIGKILL)
    at_kill = job(gateway, key, job_id)
    assert at_kill["status"] == "running" and at_kill["checkpoint_step"] < 300
    trainers.start()  # its sweep finds the job without a live worker and queues it again
    view = finished(gateway, key, job_id)
    assert view["status"] == "succeeded", view
    assert view["attempts"] == 2 and view["progress"]["step"] == 300
    kept = segments(sessions, job_id)
    assert {s.attempt for s in kept} == {1, 2}
    assert_billed_once(sessions, view)


def test_a_job_whose_message_the_broker_lost_is_sent_again(
    gateway, trainers, tenant_factory, redis_client
):
    """Redis restarted without persistence while a job was queued: the job is still queued
    in the ledger, its message gone. An idle train worker notices and sends it again."""
    trainers.stop_all()
    _, key, _ = tenant_factory.create("pro")
    made = create(gateway, key, striped(3), steps=20, checkpoint_every=10)
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]
    assert redis_client.delete(TRAIN_QUEUE) == 1  # the message, lost
    assert job(gateway, key, job_id)["status"] == "queued"
    trainers.start()
    view = finished(gateway, key, job_id)
    assert view["status"] == "succeeded", view
    assert view["attempts"] == 1 and view["progress"]["step"] == 20


def test_cancel_stops_a_running_job_and_bills_the_steps_it_ran(
    gateway, trainers, tenant_factory, sessions, stack_env
):
    tenant_id, key, _ = tenant_factory.create("free")  # one training job at a time
    made = create(gateway, key, striped(2), steps=5000, checkpoint_every=1000)
    assert made.status_code == 201, made.text
    job_id = made.json()["id"]
    second = create(gateway, key, striped(2), steps=10)
    assert second.status_code == 429 and "1 fine-tuning job" in second.text
    wait_for(lambda: job(gateway, key, job_id)["progress"]["step"] >= 5, 60, "a few steps")
    cancelled = httpx.post(f"{gateway.url}/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key))
    assert cancelled.status_code == 200
    view = finished(gateway, key, job_id)
    assert view["status"] == "cancelled" and view["adapter_id"] is None
    assert 5 <= view["checkpoint_step"] < 5000
    assert_billed_once(sessions, view)
    [record] = usage_rows(sessions, job_id)
    assert record.status == "cancelled" and record.gpu_seconds > 0
    assert stored(stack_env, tenant_id) == []  # no dataset, no checkpoint left behind
    again = create(gateway, key, striped(2), steps=1)
    assert again.status_code == 201  # the limit is free again
    cancelled_queued = httpx.post(
        f"{gateway.url}/v1/fine_tuning/jobs/{again.json()['id']}/cancel", headers=auth(key)
    ).json()
    assert cancelled_queued["status"] in ("cancelled", "running", "succeeded")
    finished(gateway, key, again.json()["id"])
    wait_for(
        lambda: not any(k.startswith("datasets/") for k in stored(stack_env, tenant_id)),
        30,
        "the dataset to go",
    )


def test_another_tenant_can_read_cancel_or_use_none_of_it(
    gateway, sd_worker, trainers, tenant_factory
):
    _, mine, _ = tenant_factory.create("pro")
    _, theirs, _ = tenant_factory.create("max")
    made = create(gateway, mine, striped(2), steps=4, checkpoint_every=2)
    view = finished(gateway, mine, made.json()["id"])
    assert view["status"] == "succeeded"
    job_id, adapter_id = view["id"], view["adapter_id"]
    tries = [
        ("GET", f"/v1/fine_tuning/jobs/{job_id}"),
        ("POST", f"/v1/fine_tuning/jobs/{job_id}/cancel"),
        ("GET", f"/v1/adapters/{adapter_id}"),
        ("GET", f"/v1/adapters/{adapter_id}/content"),
        ("DELETE", f"/v1/adapters/{adapter_id}"),
    ]
    for method, path in tries:
        answer = httpx.request(method, f"{gateway.url}{path}", headers=auth(theirs))
        assert answer.status_code == 404, (method, path, answer.text)
    assert image(gateway, theirs, lora=adapter_id).status_code == 404
    for listing in ("/v1/fine_tuning/jobs", "/v1/adapters"):
        assert httpx.get(f"{gateway.url}{listing}", headers=auth(theirs)).json()["data"] == []
    # still there for its owner
    assert (
        httpx.get(f"{gateway.url}/v1/adapters/{adapter_id}", headers=auth(mine)).status_code == 200
    )


class TestBadInput:
    """Refused at the door, naming the problem; nothing is stored or queued."""

    @pytest.mark.parametrize(
        ("data", "params", "status", "named"),
        [
            (b"not a zip", {}, 400, "not a zip archive"),
            (zipped({"a.png": picture(0)}), {}, 400, "a.png has no caption"),
            (zipped({"a.png": picture(0, 16), "a.txt": "x"}), {}, 400, "a.png is 16x16"),
            (striped(2), {"steps": 0}, 400, "field 'steps'"),
            (striped(2), {"learning_rate": "nan"}, 400, "field 'learning_rate'"),
            (striped(2), {"resolution": 100}, 400, "field 'resolution'"),
            (striped(2), {"rank": 1000}, 400, "field 'rank'"),
            (striped(2), {"model": "no-such-model"}, 404, "no-such-model"),
        ],
    )
    def test_refused(self, gateway, tenant_factory, data, params, status, named):
        _, key, _ = tenant_factory.create("pro")
        answer = create(gateway, key, data, **params)
        assert answer.status_code == status, answer.text
        assert named in answer.text
        assert (
            httpx.get(f"{gateway.url}/v1/fine_tuning/jobs", headers=auth(key)).json()["data"] == []
        )

    def test_a_dataset_over_the_tier_s_limit(self, gateway, tenant_factory, stack_env):
        _, key, _ = tenant_factory.create("free")
        noise = base64.b64encode(bytes(range(256)) * 250_000)  # ~85 MB, over Free's 50 MB
        answer = create(gateway, key, zipped({"a.png": picture(0), "a.txt": noise}))
        assert answer.status_code == 413, answer.text
        assert "limit" in answer.text

    def test_the_job_limit_is_checked_before_a_picture_is_decoded(self, gateway, tenant_factory):
        """A Free tenant (one job at a time) with a job queued, then four uploads at once of a
        dataset whose picture is damaged: decoding one would be a 400; each is a 429 first."""
        _, key, _ = tenant_factory.create("free")
        first = create(gateway, key, striped(2), steps=1000)
        assert first.status_code == 201, first.text
        try:
            damaged = zipped({"a.png": b"not a picture", "a.txt": "a caption"})
            with ThreadPoolExecutor(4) as pool:
                answers = list(pool.map(lambda _: create(gateway, key, damaged), range(4)))
            assert [a.status_code for a in answers] == [429] * 4, [a.text for a in answers]
            assert "allows 1 fine-tuning job(s)" in answers[0].text
        finally:
            job_id = first.json()["id"]
            httpx.post(f"{gateway.url}/v1/fine_tuning/jobs/{job_id}/cancel", headers=auth(key))

    def test_a_training_file_must_be_the_tenants_and_for_fine_tuning(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("pro")
        _, other, _ = tenant_factory.create("pro")
        batch_file = upload(gateway, key, striped(2), "batch")
        theirs = upload(gateway, other, striped(2), "fine-tune")
        mine = upload(gateway, key, striped(2), "fine-tune")
        for form, status, named in (
            ({"training_file": batch_file}, 400, "is for batch, not fine-tune"),
            ({"training_file": theirs}, 404, f"no file '{theirs}'"),
        ):
            answer = httpx.post(
                f"{gateway.url}/v1/fine_tuning/jobs", data=form, headers=auth(key), timeout=60
            )
            assert answer.status_code == status and named in answer.text, answer.text
        both = httpx.post(
            f"{gateway.url}/v1/fine_tuning/jobs",
            data={"training_file": mine},
            files={"dataset": ("pictures.zip", striped(2), "application/zip")},
            headers=auth(key),
            timeout=60,
        )
        assert both.status_code == 400 and "one of the two" in both.text, both.text

    def test_no_dataset(self, gateway, tenant_factory):
        _, key, _ = tenant_factory.create("pro")
        answer = httpx.post(
            f"{gateway.url}/v1/fine_tuning/jobs", data={"steps": "5"}, headers=auth(key)
        )
        assert answer.status_code == 400 and "dataset" in answer.text, answer.text
