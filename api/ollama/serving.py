"""Turns an Ollama request into a job, and the job's chunks into Ollama's responses."""

import json
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.dispatch import Chunk, Job
from api.errors import ApiError, NotFound, UpstreamError
from api.ollama.schemas import (
    ChatRequest,
    GenerateRequest,
    ImageLimits,
    final_fields,
    new_request_id,
    timestamp,
)
from api.state import AppState
from billing.tenants import KeyOwner
from workers.contract import DoneChunk, ErrorChunk, TokenChunk

CLIENT_CLOSED = 499


class OllamaServing:
    def __init__(self, state: AppState):
        self.state = state

    def _limits(self) -> ImageLimits:
        s = self.state.settings
        return ImageLimits(max_count=s.max_images_per_request, max_pixels=s.max_image_pixels)

    async def respond(
        self, body: ChatRequest | GenerateRequest, owner: KeyOwner, request: Request
    ) -> Response:
        started = time.monotonic()
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
        request_id = new_request_id()
        spec = body.to_job(owner, request_id, self._limits())  # validates before admission
        lease = await self.state.admission.acquire(owner.tenant_id, owner.tier, request_id)
        job = Job(self.state, spec, lease)
        headers = {"X-Request-Id": request_id}
        render = _Renderer(body, started)
        try:
            await job.enqueue()
            waiting = job.chunks(disconnected=request.is_disconnected)
            first = await anext(waiting, None)
            await waiting.aclose()
            if first is None:  # the client left while the job was queued
                await job.close()
                return Response(status_code=CLIENT_CLOSED)
            if isinstance(first, ErrorChunk):
                raise UpstreamError(first.status, first.message)
            if not body.stream:
                whole = await render.whole(first, job, request)
        except ApiError as exc:
            await job.close()
            exc.headers.setdefault("X-Request-Id", request_id)
            raise
        except BaseException:
            await job.close()
            raise
        if not body.stream:
            await job.close()
            return JSONResponse(whole, headers=headers)
        return StreamingResponse(
            render.lines(first, job), media_type="application/x-ndjson", headers=headers
        )


class _Renderer:
    def __init__(self, body: ChatRequest | GenerateRequest, started: float):
        self.model = body.model
        self.chat = isinstance(body, ChatRequest)
        self.started = started

    def _payload(self, text: str) -> dict:
        if self.chat:
            return {"message": {"role": "assistant", "content": text}}
        return {"response": text}

    def render(self, chunk: Chunk, text: str | None = None) -> dict:
        head = {"model": self.model, "created_at": timestamp()}
        if isinstance(chunk, TokenChunk):
            return head | self._payload(chunk.text) | {"done": False}
        if isinstance(chunk, DoneChunk):
            total = time.monotonic() - self.started
            return head | self._payload(text or "") | final_fields(chunk, total)
        return {"error": chunk.message}

    async def lines(self, first: Chunk, job: Job) -> AsyncIterator[str]:
        try:
            yield json.dumps(self.render(first)) + "\n"
            if job.finished:
                return
            async for chunk in job.chunks():
                yield json.dumps(self.render(chunk)) + "\n"
        except ApiError as exc:  # the stream has started: the error is its last line
            yield json.dumps({"error": exc.message}) + "\n"
        finally:
            await job.close()

    async def whole(self, first: Chunk, job: Job, request: Request) -> dict:
        parts: list[str] = []
        chunk = first
        if isinstance(chunk, TokenChunk):
            parts.append(chunk.text)
            async for chunk in job.chunks(disconnected=request.is_disconnected):
                if isinstance(chunk, TokenChunk):
                    parts.append(chunk.text)
        if isinstance(chunk, ErrorChunk):
            raise UpstreamError(chunk.status, chunk.message)
        if not isinstance(chunk, DoneChunk):
            raise UpstreamError(502, "the model's stream ended without a result")
        return self.render(chunk, "".join(parts))
