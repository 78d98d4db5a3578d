"""Jobs as the gateway makes them, for tests and benchmarks that run an engine in process or
send straight to a worker: a fresh request id and, unless given, a tenant of their own."""

import time
import uuid

from workers.contract import ChatJob, ChatTurn, ImageJob, SamplingOptions

LLAVA = "llava-llama3"


def chat_job(
    turns: str | list[ChatTurn],
    tokens: int = 20,
    temperature: float = 0.0,
    seed: int | None = 1,
    images=(),
    model: str = LLAVA,
    kind: str = "chat",
    tenant_id: uuid.UUID | None = None,
    key_id: uuid.UUID | None = None,
    **more,
) -> ChatJob:
    """A chat job: `turns`, or one user turn of that text (with `images`); sampled with
    `temperature` (0: greedy) and `seed`, at most `tokens` of answer; `more`: any other
    ChatJob field (logprobs go in `options`, so pass `options=`... to replace them whole)."""
    if isinstance(turns, str):
        turns = [ChatTurn(role="user", content=turns, images=list(images))]
    options = more.pop(
        "options", SamplingOptions(max_tokens=tokens, temperature=temperature, seed=seed)
    )
    return ChatJob(
        request_id=uuid.uuid4().hex,
        tenant_id=tenant_id or uuid.uuid4(),
        api_key_id=key_id,
        model=model,
        kind=kind,
        messages=turns,
        options=options,
        enqueued_at=time.time(),
        **more,
    )


def image_job(
    prompt: str = "a lighthouse",
    size: int = 64,
    steps: int = 25,
    seed: int = 1,
    model: str = "stable-diffusion",
    **more,
) -> ImageJob:
    """A text-to-image job of `size` x `size` pixels; `more`: any other ImageJob field."""
    fields = {"kind": "txt2img", "guidance_scale": 7.5, "scheduler": "euler", "n": 1} | more
    return ImageJob(
        request_id=uuid.uuid4().hex,
        tenant_id=uuid.uuid4(),
        api_key_id=None,
        model=model,
        prompt=prompt,
        width=size,
        height=size,
        steps=steps,
        seed=seed,
        enqueued_at=time.time(),
        **fields,
    )
