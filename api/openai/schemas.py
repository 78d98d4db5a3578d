"""OpenAI's chat completion wire format; requests translate themselves into jobs."""

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

from api.errors import BadRequest
from api.inputs.image_checks import check_image
from api.inputs.output_format import openai_response_format
from api.inputs.tools import choice_format, tool_specs, turn_text
from api.inputs.wire import ChatImageLimits, chat_job
from api.sd.schemas import MIN_SIDE, ImagesRequest
from workers.contract import ChatJob, ChatTurn, DoneChunk, SamplingOptions


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


ContentPart = Annotated[TextPart | ImagePart, Field(discriminator="type")]


class CalledFunction(BaseModel):
    name: str = Field(min_length=1)
    arguments: str = "{}"  # JSON text, as the API gave it


class ToolCall(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = ""
    type: Literal["function"] = "function"
    function: CalledFunction


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[ContentPart] | None = None
    tool_calls: list[ToolCall] | None = None  # an assistant turn's calls, sent back
    tool_call_id: str | None = None  # a tool turn: the call it answers


# Answers to one request (`n`): they run together, in the request's one slot, as rows of the
# engine's batch, and the request is billed for all of them.
MAX_CHOICES = 8


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatCompletionRequest(BaseModel):
    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1)
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: list[str] | None = Field(None, max_length=4)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="answers, each sampled on its own")
    stream: bool = False
    stream_options: StreamOptions | None = None
    response_format: Any = None
    tools: list[Any] | None = None
    tool_choice: Any = None  # auto (the default), none, required, or a function named
    logprobs: bool | None = None  # the answer's tokens' log probabilities
    top_logprobs: int | None = Field(None, ge=0, le=20)  # alternatives for each (logprobs on)

    @field_validator("stop", mode="before")
    @classmethod
    def _one_stop(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    def carries_images(self) -> bool:
        return any(
            isinstance(part, ImagePart)
            for message in self.messages
            if isinstance(message.content, list)
            for part in message.content
        )

    def image_count(self) -> int:
        return sum(
            isinstance(part, ImagePart)
            for message in self.messages
            if isinstance(message.content, list)
            for part in message.content
        )

    def without_url_images(self) -> "ChatCompletionRequest":
        """This request with its http(s) image parts left out (what can be checked of it
        before they are fetched)."""
        messages = [
            message.model_copy(
                update={
                    "content": [
                        part
                        for part in message.content
                        if not (
                            isinstance(part, ImagePart)
                            and not part.image_url.url.startswith("data:")
                        )
                    ]
                }
            )
            if isinstance(message.content, list)
            else message
            for message in self.messages
        ]
        return self.model_copy(update={"messages": messages})

    def image_urls(self) -> list[tuple[str, str]]:
        """(field, url) of every image part that is not a data: URL."""
        found = []
        for i, message in enumerate(self.messages):
            if isinstance(message.content, list):
                for j, part in enumerate(message.content):
                    if isinstance(part, ImagePart) and not part.image_url.url.startswith("data:"):
                        found.append((f"messages[{i}].content[{j}].image_url", part.image_url.url))
        return found

    def to_job(
        self, owner, request_id: str, limits: ChatImageLimits, fetched: dict[str, str]
    ) -> ChatJob:
        """`fetched`: base64 images already downloaded for the non-data URLs, by URL."""
        if self.top_logprobs is not None and not self.logprobs:
            raise BadRequest(
                "field 'top_logprobs': needs 'logprobs' set to true", param="top_logprobs"
            )
        specs = [] if self.tool_choice == "none" else tool_specs(self.tools)
        output_format = openai_response_format(self.response_format)
        calling = choice_format(specs, self.tool_choice)
        if calling is not None and output_format is not None:
            raise BadRequest(
                "field 'response_format': not with a tool_choice that requires a call",
                param="response_format",
            )
        output_format = calling or output_format
        if self.n > 1 and specs:
            raise BadRequest("field 'n': one answer when tools are offered", param="n")
        turns, count = [], 0
        for i, message in enumerate(self.messages):
            texts, images = [], []
            parts = message.content if isinstance(message.content, list) else None
            if parts is None:
                texts.append(message.content or "")
            for j, part in enumerate(parts or []):
                if isinstance(part, TextPart):
                    texts.append(part.text)
                    continue
                field = f"messages[{i}].content[{j}].image_url"
                count += 1
                if count > limits.max_count:
                    raise BadRequest(f"{field}: at most {limits.max_count} images per request")
                url = part.image_url.url
                if not url.startswith("data:") and url not in fetched:
                    raise BadRequest(
                        f"{field}: an http(s) image URL is fetched for a request answered at "
                        "once only; for a job or a batch line, send the image in a data: URL "
                        "(data:image/png;base64,...)",
                        param=field,
                    )
                data = fetched.get(url, url)
                images.append(check_image(data, field, limits.max_pixels, limits.side))
            role = "system" if message.role == "developer" else message.role
            calls = [(c.function.name, c.function.arguments) for c in message.tool_calls or []]
            text = turn_text("\n".join(texts), calls)
            turns.append(ChatTurn(role=role, content=text, images=images))
        max_tokens = self.max_completion_tokens or self.max_tokens
        logprobs = (self.top_logprobs or 0) if self.logprobs else None
        job = _job(self, owner, request_id, "chat", turns, max_tokens, logprobs)
        return job.model_copy(update={"output_format": output_format, "tools": specs})


class CompletionRequest(BaseModel):
    """POST /v1/completions (legacy text completions): the prompt is the model's whole input,
    as given, without the chat template."""

    model_config = ConfigDict(extra="ignore", allow_inf_nan=False)

    model: str = Field(min_length=1)
    prompt: str | list[str]
    max_tokens: int = Field(16, ge=1)  # OpenAI's default
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, ge=0, le=1)
    seed: int | None = Field(None, ge=-(2**63), lt=2**63)
    stop: list[str] | None = Field(None, max_length=4)
    stream: bool = False
    stream_options: StreamOptions | None = None
    echo: bool = False  # the prompt before the completion, in its text
    # the completion's tokens' log probabilities, each with this many likeliest alternatives
    logprobs: int | None = Field(None, ge=0, le=5)
    n: int = Field(1, ge=1, le=MAX_CHOICES, description="completions, each sampled on its own")
    # not done yet: refused by name when asked for, rather than ignored
    best_of: int | None = Field(None, ge=1, le=1, description="only 1 is supported")
    suffix: str | None = None

    _one_stop = field_validator("stop", mode="before")(
        lambda cls, value: [value] if isinstance(value, str) else value
    )

    def text(self) -> str:
        prompts = [self.prompt] if isinstance(self.prompt, str) else self.prompt
        if len(prompts) != 1:
            raise BadRequest(
                f"field 'prompt': {len(prompts)} prompts; one per request is supported",
                param="prompt",
            )
        if not prompts[0]:
            raise BadRequest(
                "field 'prompt': empty; the prompt is the model's whole input", param="prompt"
            )
        return prompts[0]

    def to_job(self, owner, request_id: str) -> ChatJob:
        if self.suffix is not None:
            raise BadRequest("field 'suffix': not supported by this server yet", param="suffix")
        turns = [ChatTurn(role="user", content=self.text())]
        job = _job(self, owner, request_id, "generate", turns, self.max_tokens, self.logprobs)
        return job.model_copy(update={"raw": True})


def _job(
    body,
    owner,
    request_id: str,
    kind: str,
    turns: list,
    max_tokens: int | None,
    logprobs: int | None = None,
) -> ChatJob:
    """A chat or completion request's job: its turns, and its sampling options as given
    (`logprobs`: alternatives per token, when the request asked for log probabilities)."""
    given = {
        "max_tokens": max_tokens,
        "temperature": body.temperature,
        "top_p": body.top_p,
        "seed": body.seed,
        "stop": body.stop,
        "logprobs": logprobs,
    }
    options = SamplingOptions(**{k: v for k, v in given.items() if v is not None})
    return chat_job(owner, request_id, body.model, kind, turns, options, n=body.n)


def usage(done: DoneChunk) -> dict:
    return {
        "prompt_tokens": done.prompt_tokens,
        "completion_tokens": done.output_tokens,
        "total_tokens": done.prompt_tokens + done.output_tokens,
        "gpu_seconds": round(done.gpu_seconds, 3),
        # time between arrival and start (waiting for a slot, then for a worker): not billed
        "queue_seconds": round(done.queue_seconds, 6),
    }


def finish_reason(reason: str, called: bool = False) -> str:
    """OpenAI's finish reason for an answer that ended so (`DoneChunk.done_reason`)."""
    if called:
        return "tool_calls"
    return "length" if reason == "length" else "stop"


def parse_size(size: str) -> tuple[int, int]:
    width, sep, height = size.partition("x")
    if not (sep and width.isdigit() and height.isdigit()):
        raise BadRequest(f"field 'size': {size!r} is not WIDTHxHEIGHT, e.g. 512x512", param="size")
    if int(width) % 8 or int(height) % 8:
        raise BadRequest(f"field 'size': {size} is not a multiple of 8 on each side", param="size")
    if min(int(width), int(height)) < MIN_SIDE:
        raise BadRequest(
            f"field 'size': {size} is smaller than {MIN_SIDE} pixels on a side", param="size"
        )
    return int(width), int(height)


class GenerationsRequest(BaseModel):
    """OpenAI's POST /v1/images/generations."""

    model_config = ConfigDict(extra="ignore")

    prompt: str = Field(min_length=1, max_length=4000)
    model: str | None = None
    n: int = Field(1, ge=1)
    size: str = "512x512"
    response_format: Literal["b64_json", "url"] = "b64_json"

    def native(self) -> ImagesRequest:
        width, height = parse_size(self.size)
        return ImagesRequest(
            model=self.model, prompt=self.prompt, n=self.n, width=width, height=height
        )
