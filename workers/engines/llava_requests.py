"""A LLaVA request as the transformers engine holds it, and how a job becomes one: the chat
template, the images, the prompt's tokens and the limits of the context window."""

import base64
import io
import random
import threading
from dataclasses import dataclass, field
from typing import Any

import torch
from PIL import Image

from workers.contract import ChatJob, TokenLogprob
from workers.engines.base import InvalidRequest, TokenSink
from workers.engines.chat_prompt import context_ids, prompt_text
from workers.engines.grammar import Grammars
from workers.engines.sampling import Sampler
from workers.engines.text import Detokenizer


def _image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


@dataclass(eq=False)
class Request:
    """One request inside the engine."""

    job: ChatJob
    sink: TokenSink
    inputs: dict
    prompt_tokens: int
    max_new_tokens: int
    sampler: Sampler
    detok: Detokenizer
    done: threading.Event = field(default_factory=threading.Event)
    launched: int = 0  # decode steps launched for this request (its tokens: 1 + launched)
    output_tokens: int = 0
    started_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float = 0.0
    next_poll: float = 0.0
    reason: str | None = None  # stop | length | cancelled, once finished
    error: BaseException | None = None
    gpu_seconds: float = 0.0
    load_seconds: float = 0.0
    matcher: Any = None  # structured output: the grammar's matcher (workers.engines.grammar)
    # log probabilities of the tokens whose text is not sent yet (when the request asked)
    scored: list[TokenLogprob] = field(default_factory=list)
    context: tuple[int, ...] | None = None  # the prompt's ids, for a job that keeps them

    def emit(self, text: str) -> None:
        """Send text that became final, with the log probabilities of the tokens it came
        from if the request asked for them."""
        if not text:
            return
        if self.job.options.logprobs is None:
            self.sink.token(text)
            return
        self.sink.token(text, logprobs=self.scored)
        self.scored = []


def prepare(
    job: ChatJob,
    sink: TokenSink,
    processor,
    context_window: int,
    max_output_tokens: int,
    device: torch.device,
    grammars: Grammars | None = None,
) -> Request:
    """`job` as model inputs (on the CPU) with its sampler, detokeniser, token budget and
    grammar (structured output); a prompt past the context window is refused, naming how
    much of it the images are, and a schema that cannot be compiled is refused too."""
    conversation, images = [], []
    for turn in job.messages:
        parts = [{"type": "image"} for _ in turn.images]
        parts.append({"type": "text", "text": turn.content})
        conversation.append({"role": turn.role, "content": parts})
        images.extend(_image(b64) for b64 in turn.images)
    prompt = prompt_text(processor, conversation, job)
    inputs = processor(images=images or None, text=prompt, return_tensors="pt")
    prompt_tokens = int(inputs["input_ids"].shape[1])
    if prompt_tokens >= context_window:
        text_tokens = len(processor.tokenizer(prompt).input_ids) - len(images)
        raise InvalidRequest(
            f"prompt is {prompt_tokens} tokens (of which {prompt_tokens - text_tokens} for "
            f"{len(images)} image(s)); "
            f"the model's context window is {context_window} tokens"
        )
    options = job.options
    room = min(max_output_tokens, context_window - prompt_tokens)
    wanted = options.max_tokens if options.max_tokens is not None else room
    seed = options.seed if options.seed is not None else random.getrandbits(63)
    return Request(
        job=job,
        sink=sink,
        inputs=dict(inputs),
        prompt_tokens=prompt_tokens,
        max_new_tokens=max(1, min(wanted, room)),
        sampler=Sampler(options, seed, device),
        detok=Detokenizer(
            lambda ids: processor.tokenizer.decode(ids, skip_special_tokens=True),
            options.stop,
        ),
        matcher=grammars.matcher(job.output_format) if job.output_format and grammars else None,
        context=(
            context_ids(processor, inputs["input_ids"][0].tolist()) if job.keeps_context() else None
        ),
    )
