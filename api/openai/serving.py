"""Turns an OpenAI chat completion request into a job, and its chunks into OpenAI's shapes."""

import base64
import json
import time
from collections.abc import AsyncIterator

import httpx
from fastapi import Request
from fastapi.responses import JSONResponse, Response

from api.errors import ApiError, BadRequest, NotFound, PayloadTooLarge, error_body_openai
from api.inputs.logprobs import chat_logprobs, completion_logprobs
from api.inputs.tools import openai_call, read_call
from api.inputs.wire import ChatImageLimits, new_request_id
from api.openai.schemas import ChatCompletionRequest, CompletionRequest, finish_reason, usage
from api.pipeline.stream import Chunk
from api.pipeline.submit import complete, streamed, submit
from api.state import AppState
from billing.tenants import KeyOwner
from webhooks.targets import FetchFailed, TargetRefused, fetch, networks, parse
from workers.contract import ChatJob, DoneChunk, TokenChunk, TokenLogprob, ToolSpec, merged

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
        limits = ChatImageLimits.of(self.state.settings)
        if body.image_count() > limits.max_count:
            raise BadRequest(
                f"field 'messages': {body.image_count()} images; at most {limits.max_count} "
                "per request",
                param="messages",
            )
        request_id = new_request_id()
        urls = self._image_urls(body)
        checked = body.without_url_images() if urls else body  # what is here to check now
        spec = await self.state.decoder.run(
            owner, checked.carries_images(), checked.to_job, owner, request_id, limits, {}
        )

        async def with_fetched_images(_: ChatJob) -> ChatJob:
            """Once admitted, within the tenant's tier: the images by URL, then the job."""
            fetched = await self._fetch_images(urls)
            return await self.state.decoder.run(
                owner, True, body.to_job, owner, request_id, limits, fetched
            )

        finish = with_fetched_images if urls else None
        job = await submit(self.state, spec, owner, "openai-chat", request, finish)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        render = ChatRender(request_id, body.model, int(time.time()), include_usage, spec.tools)
        render.scoring = spec.options.logprobs is not None
        headers = job.headers
        if body.stream:
            frames = lambda chunks: sse(render, chunks)  # noqa: E731
            return await streamed(job, request, frames, SSE, headers, bool(spec.tools))
        tokens: list[TokenChunk] = []
        _, final = await complete(job, request, tokens)
        return JSONResponse(render.completion(tokens, final), headers=headers)

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
        headers = job.headers
        render.echo = echo
        if body.stream:
            frames = lambda chunks: sse(render, chunks)  # noqa: E731
            return await streamed(job, request, frames, SSE, headers)
        tokens: list[TokenChunk] = []
        _, final = await complete(job, request, tokens)
        return JSONResponse(render.completion(tokens, final), headers=headers)

    def _image_urls(self, body: ChatCompletionRequest) -> list[tuple[str, str]]:
        """(field, url) of the request's http(s) images, each well formed; refused at once if
        this server fetches none."""
        urls = body.image_urls()
        settings = self.state.settings
        if urls and not settings.fetch_image_urls:
            field, _ = urls[0]
            raise BadRequest(
                f"{field}: only data: URLs are accepted (fetching http(s) images is disabled "
                "on this server)",
                param=field,
            )
        for field, url in urls:
            try:
                parse(url, "image URL")
            except TargetRefused as exc:
                raise BadRequest(f"{field}: {exc}", param=field) from None
        return urls

    async def _fetch_images(self, urls: list[tuple[str, str]]) -> dict[str, str]:
        """The images at `urls`, base64, by URL: at most the largest body a request may send
        (GPUHOST_MAX_BODY_BYTES) fetched in all, as if they had come in the request."""
        settings = self.state.settings
        fetched, allowed = {}, networks(settings.image_url_allowed_networks)
        budget = settings.max_body_bytes
        async with httpx.AsyncClient(timeout=FETCH_TIMEOUT_SECONDS) as client:
            for field, url in urls:
                if url in fetched:
                    continue
                if budget <= 0:
                    raise PayloadTooLarge(
                        f"{field}: the images by URL are over {settings.max_body_bytes} bytes "
                        "in all, the most a request may carry",
                        param=field,
                    )
                try:
                    data = await fetch(client, url, allowed, budget, "image URL")
                except (TargetRefused, FetchFailed) as exc:
                    raise BadRequest(f"{field}: {exc}", param=field) from None
                budget -= len(data)
                fetched[url] = base64.b64encode(data).decode()
        return fetched


def answers(done: DoneChunk) -> list[str]:
    """How each of the job's answers ended (one, unless it asked for n)."""
    return done.choices or [done.done_reason]


def by_choice(tokens: list[TokenChunk], count: int) -> list[TokenChunk]:
    """Each of `count` answers, its token chunks merged."""
    split: list[list[TokenChunk]] = [[] for _ in range(count)]
    for chunk in tokens:
        split[chunk.choice or 0].append(chunk)
    return [merged(chunks) for chunks in split]


class ChatRender:
    """Chunks as chat.completion.chunk events; a DoneChunk as the finishing events (one per
    answer, with n of them)."""

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
        self._role_sent: set[int] = set()
        self._called = False

    def _calls(self, text: str) -> list[dict] | None:
        call = read_call(text, self.tools)
        if call is None:
            return None
        self._called = True
        return [openai_call(call)]

    def _chunk(self, delta: dict, index: int = 0, reason: str | None = None, logprobs=None):
        choice = {"index": index, "delta": delta, "finish_reason": reason, "logprobs": logprobs}
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
            index = chunk.choice or 0
            calls = self._calls(chunk.text)
            delta = (
                {"content": chunk.text}
                if calls is None
                else {"tool_calls": [{"index": i} | call for i, call in enumerate(calls)]}
            )
            if index not in self._role_sent:
                self._role_sent.add(index)
                delta = {"role": "assistant"} | delta
            return [self._chunk(delta, index, logprobs=self._logprobs(chunk.logprobs))]
        if isinstance(chunk, DoneChunk):
            events = [
                self._chunk({}, i, finish_reason(reason, self._called))
                for i, reason in enumerate(answers(chunk))
            ]
            if self.include_usage:
                events.append(self._chunk({}) | {"choices": [], "usage": usage(chunk)})
            return events
        return [error_body_openai(chunk.status, chunk.message)]

    def completion(self, tokens: list[TokenChunk], done: DoneChunk) -> dict:
        choices = []
        reasons = answers(done)
        for i, answer in enumerate(by_choice(tokens, len(reasons))):
            calls = self._calls(answer.text)
            message = {"role": "assistant", "content": answer.text}
            if calls is not None:
                message = {"role": "assistant", "content": None, "tool_calls": calls}
            choices.append(
                {
                    "index": i,
                    "message": message,
                    "finish_reason": finish_reason(reasons[i], calls is not None),
                    "logprobs": self._logprobs(answer.logprobs),
                }
            )
        return {
            "id": self.id,
            "object": "chat.completion",
            "created": self.created,
            "model": self.model,
            "choices": choices,
            "usage": usage(done),
        }


class CompletionRender:
    """Chunks as text_completion events (legacy /v1/completions); `echo`, the prompt, comes
    first in each answer when asked for."""

    def __init__(self, request_id: str, model: str, created: int, include_usage: bool):
        self.id = f"cmpl-{request_id}"
        self.model = model
        self.created = created
        self.include_usage = include_usage
        self.echo = ""  # the prompt, sent before each answer's text
        self.scoring = False  # the request asked for log probabilities
        self._offsets: dict[int, int] = {}  # characters sent so far, by answer (text_offset)

    def _body(self, choices: list[dict]) -> dict:
        head = {"id": self.id, "object": "text_completion", "created": self.created}
        return head | {"model": self.model, "choices": choices}

    def _choice(self, index: int, text: str, reason: str | None, scored=None) -> dict:
        """Answer `index`'s `text` (the echoed prompt first, once) and its tokens' log
        probabilities."""
        if index not in self._offsets:
            text, self._offsets[index] = self.echo + text, 0
        logprobs = None
        if self.scoring or scored is not None:
            offset = self._offsets[index]
            start = offset + len(text) - sum(len(entry.token) for entry in scored or [])
            logprobs = completion_logprobs(scored or [], start)
        self._offsets[index] += len(text)
        return {"text": text, "index": index, "logprobs": logprobs, "finish_reason": reason}

    def events(self, chunk: Chunk) -> list[dict]:
        if isinstance(chunk, TokenChunk):
            choice = self._choice(chunk.choice or 0, chunk.text, None, chunk.logprobs)
            return [self._body([choice])]
        if isinstance(chunk, DoneChunk):
            events = [
                self._body([self._choice(i, "", finish_reason(reason))])
                for i, reason in enumerate(answers(chunk))
            ]
            if self.include_usage:
                events.append(self._body([]) | {"usage": usage(chunk)})
            return events
        return [error_body_openai(chunk.status, chunk.message)]

    def completion(self, tokens: list[TokenChunk], done: DoneChunk) -> dict:
        reasons = answers(done)
        choices = [
            self._choice(
                i,
                answer.text,
                finish_reason(reasons[i]),
                answer.logprobs if self.scoring else None,
            )
            for i, answer in enumerate(by_choice(tokens, len(reasons)))
        ]
        return self._body(choices) | {"usage": usage(done)}


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
