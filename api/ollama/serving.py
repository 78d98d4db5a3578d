"""Turns an Ollama request into a job, and the job's chunks into Ollama's responses."""

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response

from api.errors import ApiError, NotFound
from api.inputs.tools import read_call
from api.inputs.wire import ChatImageLimits, new_request_id, timestamp
from api.ollama.schemas import ChatRequest, GenerateRequest, final_fields
from api.pipeline.stream import Chunk
from api.pipeline.submit import complete, streamed, submit
from api.state import AppState
from billing.tenants import KeyOwner
from workers.contract import DoneChunk, TokenChunk, ToolSpec

NDJSON = "application/x-ndjson"


class OllamaServing:
    def __init__(self, state: AppState):
        self.state = state

    async def respond(
        self, body: ChatRequest | GenerateRequest, owner: KeyOwner, request: Request
    ) -> Response:
        started = time.time()
        if not self.state.serves(body.model):
            available = ", ".join(self.state.model_names())
            raise NotFound(f"model '{body.model}' not found; available: {available}")
        if isinstance(body, GenerateRequest) and body.is_load_only():
            return JSONResponse(
                {
                    "model": body.model,
                    "created_at": timestamp(),
                    "response": "",
                    "done": True,
                    "done_reason": "load",
                }
            )
        limits = ChatImageLimits.of(self.state.settings)
        spec = await self.state.decoder.run(  # validates before admission
            owner, body.carries_images(), body.to_job, owner, new_request_id(), limits
        )
        chat = isinstance(body, ChatRequest)
        family = "ollama-chat" if chat else "ollama-generate"
        job = await submit(self.state, spec, owner, family, request)
        render = Render(body.model, chat, started, spec.tools)
        headers = job.headers
        if body.stream:
            frames = lambda chunks: ndjson(render, chunks)  # noqa: E731
            return await streamed(job, request, frames, NDJSON, headers, bool(spec.tools))
        text, final = await complete(job, request)
        return JSONResponse(render(final, text), headers=headers)


async def ndjson(render: "Render", chunks: AsyncIterator[Chunk]) -> AsyncIterator[str]:
    """One JSON line per chunk; an error after the stream started is its last line."""
    try:
        async for chunk in chunks:
            yield json.dumps(render(chunk)) + "\n"
    except ApiError as exc:
        yield json.dumps({"error": exc.message}) + "\n"


class Render:
    """Chunks in Ollama's shapes, for /api/chat (`chat`) or /api/generate."""

    def __init__(self, model: str, chat: bool, started: float, tools: list[ToolSpec] = ()):
        self.model = model
        self.chat = chat
        self.started = started  # unix time the request arrived
        self.tools = tools  # offered: an answer that is a call to one is returned as a call

    def _payload(self, text: str) -> dict:
        if not self.chat:
            return {"response": text}
        call = read_call(text, self.tools)
        if call is not None:
            called = {"function": {"name": call["name"], "arguments": call["arguments"]}}
            return {"message": {"role": "assistant", "content": "", "tool_calls": [called]}}
        return {"message": {"role": "assistant", "content": text}}

    def __call__(self, chunk: Chunk, text: str | None = None) -> dict:
        head = {"model": self.model, "created_at": timestamp()}
        if isinstance(chunk, TokenChunk):
            return head | self._payload(chunk.text) | {"done": False}
        if isinstance(chunk, DoneChunk):
            total = time.time() - self.started
            return head | self._payload(text or "") | final_fields(chunk, total)
        return {"error": chunk.message}
