"""Resuming a stream: GET /api/jobs/{id}/stream, in the format the request was made in.

- Ollama requests (NDJSON): `?after=N`, N = the number of lines already received.
- OpenAI requests (SSE): the `Last-Event-ID` header (or `?after=N`): each event's id is its
  index, so a client resumes after the last event it saw.
Within the resume grace period after a disconnect (GPUHOST_RESUME_GRACE_SECONDS), and while
the job's stream is retained; a finished job can be re-read the same way. Tenant-scoped.
"""

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query
from fastapi.responses import StreamingResponse

from api.deps import InferenceKey, StateDep
from api.errors import BadRequest, NotFound
from api.inputs.tools import gathered
from api.ollama.serving import NDJSON, Render, ndjson
from api.openai.serving import SSE, ChatRender, CompletionRender, sse
from api.pipeline.store import JobMeta
from api.pipeline.stream import Chunk, JobStream
from api.state import AppState
from billing.tenants import KeyOwner
from workers.contract import ToolSpec

router = APIRouter(tags=["jobs"])
MAX_CHUNKS = 1_000_000  # more than any stream holds (a token or a step a chunk)


async def resume(
    state: AppState, request_id: str, owner: KeyOwner, after: int
) -> tuple[JobMeta, AsyncIterator[Chunk]]:
    """A job's chunks from index `after` on, for its own tenant only (404 for anyone else).
    With tools offered, the chunks as they were first streamed: the answer whole, then the
    final chunk (`after` counts those)."""
    meta = await JobMeta.read(state.redis, request_id)
    if meta is None or meta.tenant_id != str(owner.tenant_id):
        raise NotFound(f"job {request_id} not found (unknown, someone else's, or expired)")
    stream = JobStream(state.redis, request_id, state.settings)
    if not meta.tools:
        await stream.seek(after)
        return meta, stream.follow(attached=True)
    await stream.seek(0)
    return meta, _skipped(gathered(stream.follow(attached=True)), after)


async def _skipped(chunks: AsyncIterator[Chunk], count: int) -> AsyncIterator[Chunk]:
    async for chunk in chunks:
        if count:
            count -= 1
            continue
        yield chunk


@router.get("/api/jobs/{request_id}/stream")
async def stream(
    request_id: str,
    owner: InferenceKey,
    state: StateDep,
    after: Annotated[int | None, Query(ge=0, le=MAX_CHUNKS)] = None,
    last_event_id: Annotated[str | None, Header()] = None,
) -> StreamingResponse:
    if after is None and last_event_id is not None:
        known = last_event_id.isascii() and last_event_id.isdigit()
        if not known or int(last_event_id) >= MAX_CHUNKS:
            raise BadRequest("Last-Event-ID must be the id of an event this stream sent")
        after = int(last_event_id) + 1
    meta, chunks = await resume(state, request_id, owner, after or 0)
    headers = {"X-Request-Id": request_id}
    if meta.family == "images":
        raise BadRequest("image requests are not resumable; ask again with the same seed")
    tools = [ToolSpec(**tool) for tool in meta.tools]
    if meta.family == "openai-completion":
        render = CompletionRender(request_id, meta.model, int(meta.created), include_usage=True)
    elif meta.family == "openai-chat":
        render = ChatRender(request_id, meta.model, int(meta.created), True, tools)
    if meta.family in ("openai-chat", "openai-completion"):
        return StreamingResponse(
            sse(render, chunks, first_index=after or 0), media_type=SSE, headers=headers
        )
    render = Render(meta.model, meta.family == "ollama-chat", meta.created, tools)
    return StreamingResponse(ndjson(render, chunks), media_type=NDJSON, headers=headers)
