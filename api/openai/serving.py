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
from api.openai.logprobs import chat_logprobs, completion_logprobs
from api.openai.schemas import ChatCompletionRequest, CompletionRequest, finish_reason, usage
from api.state import AppState
from api.tools import gathered, openai_call, read_call
from api.wire import ChatImageLimits, new_request_id
from billing.tenants import KeyOwner
from webhooks.targets import FetchFailed, TargetRefused, fetch, networks
from workers.contract import DoneChunk, TokenChunk, TokenLogprob, ToolSpec

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
        render = ChatRender(request_id, body.model, int(time.time()), include_usage, spec.tools)
        render.scoring = spec.options.logprobs is not None
        headers = {"X-Request-Id": request_id}
        if body.stream:
            first = await opened(job, request)
            chunks = live(job, first)
            if spec.tools:  # a call is known only once the answer is whole
                chunks = gathered(chunks)
            return StreamingResponse(sse(render, chunks), media_type=SSE, headers=headers)
        scored: list[TokenLogprob] | None = [] if render.scoring else None
        text, final = await complete(job, request, scored)
        return JSONResponse(render.completion(text, final, scored), headers=headers)

    async def completion(
        self, body: CompletionRequest, owner: KeyOwner, request: Request
    ) -> Response:
        """POST /v1/completions: the prompt as given, completed."""
        if not self.state.serves(body.model):
            raise NotFound(f"The model '{body.model}' does not exist", param="model")
        request_id = new_request_id()
        spec = body.to_job(owner, request_id)
        job = await submit(self.state, spec, owner, "openai-completion", request)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        render = CompletionRender(request_id, body.model, int(time.time()), include_usage)
        render.scoring = spec.options.logprobs is not None
        echo = spec.messages[-1].content if body.echo else ""
        headers = {"X-Request-Id": request_id}
        render.echo = echo
        if body.stream:
            first = await opened(job, request)
            return StreamingResponse(sse(render, live(job, first)), media_type=SSE, headers=headers)
        scored: list[TokenLogprob] | None = [] if render.scoring else None
        text, final = await complete(job, request, scored)
        return JSONResponse(render.completion(text, final, scored), headers=headers)

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

    def __init__(
        self,
        request_id: str,
        model: str,
        created: int,
        include_usage: bool,
        tools: list[ToolSpec] = (),
    ):
        self.id = f"chatcmpl-{request_id}"
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.tools = tools  # offered: an answer that is a call to one is returned as a call
        self.scoring = False  # the request asked for log probabilities
        self._role_sent = False
        self._called = False

    def _calls(self, text: str) -> list[dict] | None:
        call = read_call(text, self.tools)
        if call is None:
            return None
        self._called = True
        return [openai_call(call)]

    def _chunk(self, delta: dict, reason: str | None = None, logprobs=None) -> dict:
        choice = {"index": 0, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
        return {
            "id": self.id,
            "object": "chat.completion.chunk",
            "created": self.created,
            "model": self.model,
            "choices": [choice],
        }

    def _logprobs(self, scored: list[TokenLogprob] | None) -> dict | None:
        """A resumed stream's render is not told: its chunks carry them when asked for."""
        return chat_logprobs(scored or []) if self.scoring or scored is not None else None

    def events(self, chunk: Chunk) -> list[dict]:
        if isinstance(chunk, TokenChunk):
            calls = self._calls(chunk.text)
            delta = (
                {"content": chunk.text}
                if calls is None
                else {"tool_calls": [{"index": i} | call for i, call in enumerate(calls)]}
            )
            if not self._role_sent:
                self._role_sent = True
                delta = {"role": "assistant"} | delta
            return [self._chunk(delta, logprobs=self._logprobs(chunk.logprobs))]
        if isinstance(chunk, DoneChunk):
            events = [self._chunk({}, finish_reason(chunk, self._called))]
            if self.include_usage:
                events.append(self._chunk({}) | {"choices": [], "usage": usage(chunk)})
            return events
        return [error_body_openai(chunk.status, chunk.message)]

    def completion(self, text: str, done: DoneChunk, scored: list | None = None) -> dict:
        calls = self._calls(text)
        message = {"role": "assistant", "content": text}
        if calls is not None:
            message = {"role": "assistant", "content": None, "tool_calls": calls}
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": [
                {
                    "index": 0,
                    "message": message,
                    "finish_reason": finish_reason(done, calls is not None),
                    "logprobs": self._logprobs(scored),
                }
            ],
            "usage": usage(done),
        }


class CompletionRender:
    """Chunks as text_completion events (legacy /v1/completions); `echo`, the prompt, comes
    first when asked for."""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool):
        self.id = f"cmpl-{request_id}"
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.echo = ""  # the prompt, sent before the completion
        self.scoring = False  # the request asked for log probabilities
        self._offset = 0  # characters sent so far (logprobs' text_offset)

    def _body(self, choices: list[dict]) -> dict:
        head = {"id": self.id, "object": "text_completion", "created": self.created}
        return head | {"model": self.model, "choices": choices}

    def _choice(self, text: str, reason: str | None, scored: list | None = None) -> dict:
        """`text` (the echoed prompt first, once) and its tokens' log probabilities."""
        text, self.echo = self.echo + text, ""
        logprobs = None
        if self.scoring or scored is not None:
            start = self._offset + len(text) - sum(len(entry.token) for entry in scored or [])
            logprobs = completion_logprobs(scored or [], start)
        self._offset += len(text)
        return {"text": text, "index": 0, "logprobs": logprobs, "finish_reason": reason}

    def events(self, chunk: Chunk) -> list[dict]:
        if isinstance(chunk, TokenChunk):
            return [self._body([self._choice(chunk.text, None, chunk.logprobs)])]
        if isinstance(chunk, DoneChunk):
            events = [self._body([self._choice("", finish_reason(chunk))])]
            if self.include_usage:
                events.append(self._body([]) | {"usage": usage(chunk)})
            return events
        return [error_body_openai(chunk.status, chunk.message)]

    def completion(self, text: str, done: DoneChunk, scored: list | None = None) -> dict:
        choice = self._choice(text, finish_reason(done), scored)
        return self._body([choice]) | {"usage": usage(done)}


async def sse(
    render: "ChatRender | CompletionRender", chunks: AsyncIterator[Chunk], first_index: int = 0
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
