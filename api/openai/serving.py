"""Turns an OpenAI chat completion request into a job, and its chunks into OpenAI's shapes."""

import base64
import json
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from api.errors import ApiError, BadRequest, NotFound, error_body_openai
from api.jobs.stream import Chunk
from api.jobs.submit import complete, live, opened, submit
from api.openai.schemas import ChatCompletionRequest, finish_reason, usage
from api.state import AppState
from api.wire import ChatImageLimits, new_request_id
from billing.tenants import KeyOwner
from webhooks.targets import FetchFailed, TargetRefused, fetch, networks
from workers.contract import DoneChunk, TokenChunk

SSE = "text/event-stream"
FETCH_TIMEOUT_SECONDS = 10


class OpenAIServing:
    def __init__(self, state: AppState):
        self.state = state

    async def chat(
        self, body: ChatCompletionRequest, owner: KeyOwner, request: Request
    ) -> Response:
        if not self.state.serves(body.model):
            raise NotFound(f"The model '{body.model}' does not exist", param="model")
        fetched = await self._fetch_images(body)
        limits = ChatImageLimits.of(self.state.settings)
        request_id = new_request_id()
        spec = await self.state.decoder.run(
            owner, body.carries_images(), body.to_job, owner, request_id, limits, fetched
        )
        job = await submit(self.state, spec, owner, "openai-chat", request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        render = ChatRender(request_id, body.model, int(time.time()), include_usage)
        headers = {"X-Request-Id": request_id}
        if body.stream:
            first = await opened(job, request)
            return StreamingResponse(sse(render, live(job, first)), media_type=SSE, headers=headers)
        text, final = await complete(job, request)
        return JSONResponse(render.completion(text, final), headers=headers)

    async def _fetch_images(self, body: ChatCompletionRequest) -> dict[str, str]:
        urls = body.image_urls()
        if not urls:
            return {}
        settings = self.state.settings
        if not settings.fetch_image_urls:
            field, _ = urls[0]
            raise BadRequest(
                f"{field}: only data: URLs are accepted (fetching http(s) images is disabled "
                "on this server)",
                param=field,
            )
        fetched, allowed = {}, networks(settings.image_url_allowed_networks)
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS) as client:
            for field, url in urls:
                try:
                    data = await fetch(client, url, allowed, settings.max_body_bytes, "image URL")
                except (TargetRefused, FetchFailed) as exc:
                    raise BadRequest(f"{field}: {exc}", param=field) from None
                fetched[url] = base64.b64encode(data).decode()
        return fetched


class ChatRender:
    """Chunks as chat.completion.chunk events; a DoneChunk as the finishing events."""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool):
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self._role_sent = False

    def _chunk(self, delta: dict, reason: str | None = None) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [{"index": 0, "delta": delta, "finish_reason": reason, "logprobs": None}],
        }

    def events(self, chunk: Chunk) -> list[dict]:
        if isinstance(chunk, TokenChunk):
            delta = {"content": chunk.text}
            if not self._role_sent:
                self._role_sent = True
                delta = {"role": "assistant"} | delta
            return [self._chunk(delta)]
        if isinstance(chunk, DoneChunk):
            events = [self._chunk({}, finish_reason(chunk))]
            if self.include_usage:
                events.append(self._chunk({}) | {"choices": [], "usage": usage(chunk)})
            return events
        return [error_body_openai(chunk.status, chunk.message)]

    def completion(self, text: str, done: DoneChunk) -> dict:
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": text},
                    "finish_reason": finish_reason(done),
                    "logprobs": None,
                }
            ],
            "usage": usage(done),
        }


async def sse(
    render: ChatRender, chunks: AsyncIterator[Chunk], first_index: int = 0
) -> AsyncIterator[str]:
    """Server-sent events; each chunk's index is its event id (for Last-Event-ID)."""
    index = first_index
    try:
        async for chunk in chunks:
            for event in render.events(chunk):
                yield f"id: {index}\ndata: {json.dumps(event)}\n\n"
            index += 1
    except ApiError as exc:
        yield f"data: {json.dumps(error_body_openai(exc.status, exc.message))}\n\n"
    yield "data: [DONE]\n\n"
