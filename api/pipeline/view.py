"""What an async job (or a batch line) looks like to its tenant: its record and a snapshot of
its stream, read into one view (GET /v1/jobs/{id}, webhook payloads, batch results)."""

import asyncio
import json
import time

from api.inputs.logprobs import chat_logprobs
from api.inputs.tools import openai_call, read_call
from api.pipeline import store
from api.pipeline.stream import JobStream
from api.state import AppState
from workers.contract import (
    LLAVA_QUEUE,
    SD_QUEUE,
    DoneChunk,
    ErrorChunk,
    ImagesChunk,
    ProgressChunk,
    TokenChunk,
    ToolSpec,
    merged,
)

FINISHED = ("succeeded", "failed", "cancelled")


TIMES = ("created_at", "submitted_at", "started_at", "finished_at")


async def job_view(state: AppState, job_id: str, tenant_id: str) -> dict:
    """The job as it stands now (404 unless it is `tenant_id`'s), its times in whole Unix
    seconds, as every OpenAI-style object has them."""
    view = await _view(state, job_id, tenant_id)
    return view | {name: int(view[name]) for name in TIMES if view[name] is not None}


async def _view(state: AppState, job_id: str, tenant_id: str) -> dict:
    record = await store.job_record(state.redis, job_id, tenant_id)
    view = {
        "id": job_id,
        "type": record["type"],
        "model": record["model"],
        "created_at": float(record["created_at"]),
        # enqueued to a worker (a slot taken), started on it, ended: unix seconds or null
        "submitted_at": float(record["submitted_at"]) if "submitted_at" in record else None,
        "started_at": None,
        "finished_at": None,
        "status": "queued",
        "progress": None,
        "output": None,
        "error": None,
        "gpu_seconds": None,
        "queue_seconds": None,
        # while it waits for a worker with room: its place among the waiting jobs (1: next)
        # and when it may start, in seconds from now (null where not known)
        "queue_position": None,
        "estimated_start_seconds": None,
    }
    if record["state"] == store.CANCELLED:
        return view | {"status": "cancelled"}
    if record["state"] != store.SUBMITTED_STATE:
        return view
    stream = JobStream(state.redis, job_id, state.settings)
    tokens, progress = [], None
    for written_at, chunk in await stream.snapshot():
        if isinstance(chunk, TokenChunk):
            tokens.append(chunk)
        elif isinstance(chunk, ProgressChunk):
            progress = {"step": chunk.step, "steps": chunk.steps}
        elif isinstance(chunk, DoneChunk | ImagesChunk | ErrorChunk):
            ended = view | _ended(view, chunk, written_at, merged(tokens))
            return _with_call(ended, record.get("tools"), f"call_{job_id[:24]}")
    if tokens:
        progress = {"tokens": len(tokens)}
    if await stream.started():
        return view | {"status": "running", "progress": progress}
    queue = SD_QUEUE if record["type"] == "images" else LLAVA_QUEUE
    place = await state.fleet.book.position(queue, job_id)
    if place:
        view |= {
            "queue_position": place,
            "estimated_start_seconds": await state.fleet.book.estimated_start(queue, place),
        }
    return view | {"status": "queued", "progress": progress}


def _ended(view: dict, chunk, finished_at: float, answer: TokenChunk) -> dict:
    """The fields of an ended job: when it ended (its final chunk's stream time) and started
    (its queue time after submission, as the worker measured it), and what came of it (its
    `answer`, with its tokens' log probabilities when they were asked for)."""
    ended = {"finished_at": finished_at, "started_at": None}
    if isinstance(chunk, ErrorChunk):
        return ended | {"status": "failed", "error": chunk.message}
    if view["submitted_at"] is not None:
        ended["started_at"] = view["submitted_at"] + chunk.queue_seconds
    cost = {"gpu_seconds": chunk.gpu_seconds, "queue_seconds": chunk.queue_seconds}
    if isinstance(chunk, ImagesChunk):
        output = {"images": chunk.images, "seed": chunk.seed}
        return ended | cost | {"status": "succeeded", "output": output}
    usage = {"prompt_tokens": chunk.prompt_tokens, "completion_tokens": chunk.output_tokens}
    status = "cancelled" if chunk.done_reason == "cancelled" else "succeeded"
    output = {"text": answer.text, "finish_reason": chunk.done_reason, **usage}
    if answer.logprobs is not None:
        output["logprobs"] = chat_logprobs(answer.logprobs)
    return ended | cost | {"status": status, "output": output}


def _with_call(view: dict, tools: str | None, call_id: str) -> dict:
    """With tools offered, an answer that is a call has it as `output.tool_calls` (OpenAI's
    form) and `finish_reason` "tool_calls"."""
    output = view.get("output") or {}
    if not tools or "text" not in output:
        return view
    call = read_call(output["text"], [ToolSpec(**spec) for spec in json.loads(tools)], call_id)
    if call is None:
        return view
    called = {"tool_calls": [openai_call(call)], "finish_reason": "tool_calls"}
    return view | {"output": output | called}


async def settled_view(state: AppState, job_id: str, tenant_id: str, wait: float) -> dict:
    """The job's view once it has finished, or after `wait` seconds, whichever comes first."""
    deadline = time.monotonic() + wait
    while True:
        view = await job_view(state, job_id, tenant_id)
        if view["status"] in FINISHED or time.monotonic() >= deadline:
            return view
        await asyncio.sleep(0.1)
