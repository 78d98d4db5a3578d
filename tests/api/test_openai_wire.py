"""One wire style on the OpenAI routes: every list, object and error read through the official
`openai` client's own types without loss (times whole seconds, lists with their ids and
`has_more`); each route documents what it answers and how it fails in /openapi.json."""

import json

import httpx
import openai
import pytest
from openai.types import Batch, FileDeleted, FileObject, Model
from openai.types.shared import ErrorObject

from harness.helpers import MODEL, auth

TIMES = (
    "created",
    "created_at",
    "expires_at",
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "cancelling_at",
    "cancelled_at",
    "finished_at",
)


def client(gateway, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{gateway.url}/v1", api_key=key, max_retries=0, timeout=60)


def read_as(kind, raw: dict) -> None:
    """`raw` validates as the client's `kind`, keeps every field it had, and its times are
    whole seconds."""
    parsed = kind.model_validate(raw)
    assert parsed.model_dump(mode="json", exclude_unset=True) == raw
    for name in TIMES:
        assert raw.get(name) is None or type(raw[name]) is int, (name, raw[name])


def read_list_as(kind, raw: dict) -> None:
    assert raw["object"] == "list" and type(raw["has_more"]) is bool
    ids = [item["id"] for item in raw["data"]]
    assert (raw["first_id"], raw["last_id"]) == ((ids[0], ids[-1]) if ids else (None, None))
    for item in raw["data"]:
        read_as(kind, item)


def test_every_list_and_object_reads_as_the_clients_types(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    api = client(gateway, key)
    line = {
        "custom_id": "a",
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": MODEL, "messages": [{"role": "user", "content": "hi"}]},
    }
    kept = api.files.create(file=("r.jsonl", json.dumps(line).encode()), purpose="batch")
    made = api.batches.create(
        input_file_id=kept.id, endpoint="/v1/chat/completions", completion_window="24h"
    )

    def get(path: str) -> dict:
        answer = httpx.get(f"{gateway.url}{path}", headers=auth(key))
        assert answer.status_code == 200, answer.text
        return answer.json()

    read_list_as(Model, get("/v1/models"))
    read_as(Model, get(f"/v1/models/{MODEL}"))
    read_list_as(FileObject, get("/v1/files"))
    read_as(FileObject, get(f"/v1/files/{kept.id}"))
    read_list_as(Batch, get("/v1/batches"))
    read_as(Batch, get(f"/v1/batches/{made.id}"))
    # and through the client itself, pages followed
    assert [m.id for m in api.models.list()] == [m["id"] for m in get("/v1/models")["data"]]
    assert [f.id for f in api.files.list()] == [kept.id]
    assert [b.id for b in api.batches.list()] == [made.id]
    api.batches.cancel(made.id)
    deleted = httpx.delete(f"{gateway.url}/v1/files/{kept.id}", headers=auth(key)).json()
    read_as(FileDeleted, deleted)


@pytest.mark.usefixtures("worker")
def test_errors_read_as_the_clients_errors(gateway, tenant_factory):
    _, key, _ = tenant_factory.create("pro")
    api = client(gateway, key)
    failures = [
        (openai.NotFoundError, lambda: api.files.retrieve("file-none")),
        (openai.NotFoundError, lambda: api.batches.retrieve("batch_none")),
        (openai.NotFoundError, lambda: api.models.retrieve("no-such-model")),
        (
            openai.BadRequestError,
            lambda: api.chat.completions.create(model=MODEL, messages=[], max_tokens=-1),
        ),
        (openai.BadRequestError, lambda: api.files.list(order="sideways")),
        (
            openai.AuthenticationError,
            lambda: client(gateway, "gh-wrong").files.list(),
        ),
    ]
    for kind, call in failures:
        with pytest.raises(kind) as raised:
            call()
        error = ErrorObject.model_validate(raised.value.body)
        assert error.message and error.type and error.code
    # the Ollama-style routes, and this server's native ones beside them, fail their way
    native = httpx.post(f"{gateway.url}/api/images", json={}, headers=auth(key))
    assert native.status_code == 400 and isinstance(native.json()["error"], str)


def test_every_route_documents_its_answer_and_its_errors(gateway):
    """Each OpenAI-style route names the model of what it answers; every route of either
    family names its family's error."""
    spec = httpx.get(f"{gateway.url}/openapi.json").json()
    schemas = spec["components"]["schemas"]
    binary = ("/content", "/output", "/images/files/")
    checked = 0
    for path, operations in spec["paths"].items():
        if not path.startswith(("/v1/", "/api/")):
            continue
        for method, operation in operations.items():
            if path.startswith("/api/jobs/"):  # a resumed stream: of whichever family made it
                continue
            answers = operation["responses"]
            error = answers["default"]["content"]["application/json"]["schema"]["$ref"]
            family = "OpenAIError" if path.startswith("/v1/") else "OllamaError"
            assert error.endswith(family), (method, path, error)
            if path.startswith("/v1/") and not any(part in path for part in binary):
                good = next(answers[code] for code in ("200", "201", "202") if code in answers)
                reference = good["content"]["application/json"]["schema"].get("$ref", "")
                assert reference.rsplit("/", 1)[-1] in schemas, (method, path)
                checked += 1
    assert checked > 25
