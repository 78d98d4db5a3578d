"""Ollama's wire format: requests (which translate themselves into jobs) and responses."""

import re
from typing import Annotated, Any, ClassVar, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.errors import BadRequest
from api.inputs.image_checks import check_image
from api.inputs.output_format import ollama_format
from api.inputs.tools import tool_specs, turn_text
from api.inputs.wire import NS, ChatImageLimits, chat_job
from api.ollama import templates
from workers.contract import ChatJob, ChatTurn, DoneChunk, SamplingOptions


class Options(BaseModel):
    """The subset of Ollama's `options` that the engines honour; others are ignored."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    num_predict: int | None = Field(None, ge=-2, le=1_000_000)
    temperature: float | None = Field(None, ge=0, le=100)
    top_p: float | None = Field(None, ge=0, le=1)
    top_k: int | None = Field(None, ge=0, le=1_000_000)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: list[str] | None = None

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def to_sampling(self) -> SamplingOptions:
        given = {
            "max_tokens": self.num_predict if self.num_predict and self.num_predict > 0 else None,
            "temperature": self.temperature,
            "top_p": self.top_p,
            "top_k": self.top_k,
            "seed": self.seed,
            "stop": self.stop,
        }
        return SamplingOptions(**{k: v for k, v in given.items() if v is not None})


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    class Called(BaseModel):
        name: str = Field(min_length=1)
        arguments: dict | str = Field(default_factory=dict)

    function: Called


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant", "tool"]
    content: str = ""
    images: list[str] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls, sent back

    def text(self) -> str:
        """The turn as the model reads it: an assistant turn's calls are its text."""
        calls = [(c.function.name, c.function.arguments) for c in self.tool_calls or []]
        return turn_text(self.content, calls)


DURATION = re.compile(r"(\d+(?:\.\d+)?)(ns|us|µs|ms|s|m|h)")
UNIT_SECONDS = {"ns": 1e-9, "us": 1e-6, "µs": 1e-6, "ms": 1e-3, "s": 1.0, "m": 60.0, "h": 3600.0}


MAX_KEEP_ALIVE_SECONDS = 366 * 86400


def keep_alive_seconds(value: str | int | float | None) -> float | None:
    """Ollama's keep_alive: seconds as a number, or a Go duration ("5m", "1h30m", "-1"); at
    most a year (a negative value keeps the model loaded for as long as its worker runs)."""
    if value is None:
        return None
    seconds = _duration_seconds(value)
    if seconds > MAX_KEEP_ALIVE_SECONDS:
        raise ValueError(
            f"{value!r} is more than a year; a negative value keeps the model loaded for as "
            "long as its worker runs"
        )
    return seconds


def _duration_seconds(value: str | int | float) -> float:
    if isinstance(value, int | float):
        return float(value)
    text = value.strip()
    sign = -1.0 if text.startswith("-") else 1.0
    text = text.lstrip("+-")
    try:
        return sign * float(text)
    except ValueError:
        pass
    parts = DURATION.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        raise ValueError(f"{value!r} is not a duration (e.g. 300, '5m', '1h30m', '-1')")
    return sign * sum(float(n) * UNIT_SECONDS[u] for n, u in parts)


class _Request(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1)
    stream: bool = True
    options: Options = Field(default_factory=Options)
    keep_alive: str | float | None = None
    format: Any = None

    @field_validator("keep_alive")
    @classmethod
    def _duration(cls, value: str | float | None) -> str | float | None:
        keep_alive_seconds(value)  # raises ValueError, reported as a 400 naming the field
        return value

    def _job(self, kind: str, turns: list[ChatTurn], owner, request_id: str) -> ChatJob:
        return chat_job(
            owner,
            request_id,
            self.model,
            kind,
            turns,
            self.options.to_sampling(),
            keep_alive_seconds=keep_alive_seconds(self.keep_alive),
            output_format=ollama_format(self.format),
        )


def _images(images: list[str] | None, field: str, limits: "ChatImageLimits") -> list[str]:
    images = images or []
    if len(images) > limits.max_count:
        raise BadRequest(f"{field}: {len(images)} images; at most {limits.max_count} per request")
    return [
        check_image(b64, f"{field}[{i}]", limits.max_pixels, limits.side)
        for i, b64 in enumerate(images)
    ]


class ChatRequest(_Request):
    messages: list[Message] = Field(min_length=1)
    tools: list[Any] | None = None  # the model chooses whether to call one (Ollama's way)

    def carries_images(self) -> bool:
        return any(m.images for m in self.messages)

    def to_job(self, owner, request_id: str, limits: ChatImageLimits) -> ChatJob:
        total = sum(len(m.images or []) for m in self.messages)
        if total > limits.max_count:
            raise BadRequest(
                f"field 'messages': {total} images; at most {limits.max_count} per request"
            )
        turns = [
            ChatTurn(
                role=m.role,
                content=m.text(),
                images=_images(m.images, f"messages[{i}].images", limits),
            )
            for i, m in enumerate(self.messages)
        ]
        job = self._job("chat", turns, owner, request_id)
        job.tools = tool_specs(self.tools)
        return job


class GenerateRequest(_Request):
    prompt: str = ""
    system: str | None = None
    images: list[str] | None = None
    raw: bool = False  # the prompt as given, without the chat template
    # an earlier response's `context` (its token ids): that exchange's text goes first
    context: list[Annotated[int, Field(ge=0)]] | None = None
    # the prompt's template instead of the model's (api.ollama.templates: Go's syntax, the
    # part a generate prompt needs)
    template: str | None = Field(None, max_length=64 * 1024)
    # Ollama's fields this server does not do: refused by name rather than ignored
    suffix: str | None = None

    UNSUPPORTED: ClassVar[dict[str, str]] = {
        "suffix": "fill-in-the-middle (a suffix) is not supported by this model",
    }

    def _templated(self, owner, request_id: str) -> ChatJob:
        """The prompt the request's own template makes, as the model's whole input."""
        for field in ("images", "context"):
            if getattr(self, field):
                raise BadRequest(f"field '{field}': not with a template", param=field)
        text = templates.render(self.template, self.system or "", self.prompt)
        if not text:
            raise BadRequest("field 'template': it makes an empty prompt", param="template")
        job = self._job("generate", [ChatTurn(role="user", content=text)], owner, request_id)
        job.raw = True
        return job

    def is_load_only(self) -> bool:
        """Ollama clients send an empty prompt to load a model."""
        return not self.prompt and not self.images

    def carries_images(self) -> bool:
        return bool(self.images)

    def to_job(self, owner, request_id: str, limits: ChatImageLimits) -> ChatJob:
        for name, reason in self.UNSUPPORTED.items():
            if getattr(self, name):
                raise BadRequest(f"field '{name}': {reason}", param=name)
        if self.raw and (self.images or self.system or self.context or self.template):
            field = next(f for f in ("images", "system", "context", "template") if getattr(self, f))
            raise BadRequest(
                f"field '{field}': not with raw (a raw prompt is the model's whole input)",
                param=field,
            )
        if self.template:
            return self._templated(owner, request_id)
        turns = []
        if self.system:
            turns.append(ChatTurn(role="system", content=self.system))
        turns.append(
            ChatTurn(
                role="user", content=self.prompt, images=_images(self.images, "images", limits)
            )
        )
        job = self._job("generate", turns, owner, request_id)
        job.raw = self.raw
        job.context = self.context or []
        return job


class ShowRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    name: str | None = None  # older clients

    def model_name(self) -> str:
        if not (self.model or self.name):
            raise BadRequest("field 'model': required")
        return self.model or self.name


def final_fields(done: DoneChunk, total_seconds: float) -> dict:
    """Ollama's closing statistics (nanoseconds), plus what the request cost."""
    return {
        "done": True,
        "done_reason": done.done_reason,
        "total_duration": int(total_seconds * NS),
        "load_duration": int(done.load_seconds * NS),
        "prompt_eval_count": done.prompt_tokens,
        "prompt_eval_duration": int(done.prompt_eval_seconds * NS),
        "eval_count": done.output_tokens,
        "eval_duration": int(done.eval_seconds * NS),
        "gpu_seconds": round(done.gpu_seconds, 3),
        # time between arrival and start (waiting for a slot, then for a worker): not billed;
        # in nanoseconds, as Ollama's durations are (the OpenAI routes say `queue_seconds`)
        "queue_duration": int(done.queue_seconds * NS),
    } | ({"context": done.context} if done.context is not None else {})
