"""A batch line's answer as the endpoint it names answers a synchronous call: the very
`chat.completion`, `text_completion` or images response (`body`), rendered by the same code
from the line's job stream, with the status that call would have had."""

from api.errors import error_body_openai
from api.openai.serving import ChatRender, CompletionRender
from api.pipeline.stream import JobStream
from api.sd.serving import openai_images
from api.state import AppState
from workers.contract import DoneChunk, ErrorChunk, ImagesChunk, TokenChunk, ToolSpec

CHAT, COMPLETIONS, IMAGES = "/v1/chat/completions", "/v1/completions", "/v1/images/generations"
ENDPOINTS = (CHAT, COMPLETIONS, IMAGES)


class NotAnswered(Exception):
    """The line's job ended without an answer to render (cancelled before it ran, or while it
    ran)."""


def _chat(job_id: str, line: dict, created: int, tokens: list, done: DoneChunk) -> dict:
    spec = line["spec"]
    tools = [ToolSpec(**tool) for tool in spec.get("tools", [])]
    render = ChatRender(job_id, line["model"], created, False, tools)
    render.scoring = spec["options"].get("logprobs") is not None
    return render.completion(tokens, done)


def _completion(job_id: str, line: dict, created: int, tokens: list, done: DoneChunk) -> dict:
    render = CompletionRender(job_id, line["model"], created, False)
    render.scoring = line["spec"]["options"].get("logprobs") is not None
    render.echo = line.get("echo", "")
    return render.completion(tokens, done)


async def answer(state: AppState, job_id: str, line: dict, created: int) -> tuple[int, dict]:
    """(status code, body) of the ended job of a batch line in OpenAI's form (`line`: its
    checked spec, with `endpoint`); `NotAnswered` if there is nothing to render."""
    tokens: list[TokenChunk] = []
    for _, chunk in await JobStream(state.redis, job_id, state.settings).snapshot():
        if isinstance(chunk, TokenChunk):
            tokens.append(chunk)
        elif isinstance(chunk, ErrorChunk):
            return chunk.status, error_body_openai(chunk.status, chunk.message)
        elif isinstance(chunk, ImagesChunk):
            return 200, openai_images(created, [{"b64_json": png} for png in chunk.images], chunk)
        elif isinstance(chunk, DoneChunk):
            if chunk.done_reason == "cancelled":
                raise NotAnswered("cancelled while it ran (billed for what it ran)")
            render = _chat if line["endpoint"] == CHAT else _completion
            return 200, render(job_id, line, created, tokens, chunk)
    raise NotAnswered("cancelled before it ran")
