"""The interface every LLaVA engine implements."""

from dataclasses import dataclass
from typing import Literal, Protocol

from workers.contract import ChatJob, TokenLogprob


class InvalidRequest(ValueError):
    """The request cannot be run as given (e.g. longer than the context window). HTTP 400."""


class TokenSink(Protocol):
    """Where an engine sends one request's output while it runs."""

    def token(self, text: str, logprobs: list[TokenLogprob] | None = None) -> None:
        """`logprobs`: the tokens `text` came from, for a request that asked for them."""

    def should_stop(self) -> bool: ...


@dataclass(frozen=True)
class Generation:
    """What one request used, as the engine measured it."""

    done_reason: Literal["stop", "length", "cancelled"]
    prompt_tokens: int
    output_tokens: int
    prompt_eval_seconds: float
    eval_seconds: float
    # Device time this request is billed for: the engine's busy time while it ran, its share
    # when batched. Never includes queue wait or model load.
    gpu_seconds: float
    # Time spent loading the model for this request (it had been unloaded): reported, not billed.
    load_seconds: float = 0.0
    # With n answers (workers.choices): how each ended
    choices: tuple[str, ...] = ()
    # For a job that keeps it: its prompt's and answer's token ids, images left out
    context: tuple[int, ...] | None = None


class ChatEngine(Protocol):
    model_name: str
    context_window: int

    def generate(self, job: ChatJob, sink: TokenSink) -> Generation: ...

    def status(self) -> dict: ...

    def close(self) -> None: ...
