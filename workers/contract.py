"""What the gateway and the workers agree on: task names, queues, jobs, chunks (Redis keys and
scripts: `workers.keyspace`).

Imports neither torch nor any model code: the gateway imports this module.
"""

import json
import uuid
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import AliasChoices, BaseModel, ConfigDict, Field, TypeAdapter

if TYPE_CHECKING:
    from celery import Celery

LLAVA_QUEUE = "llava"
SD_QUEUE = "sd"  # reserved for Stable Diffusion workers
QUEUES = (LLAVA_QUEUE, SD_QUEUE)

TRAIN_QUEUE = "train"  # LoRA fine-tuning of Stable Diffusion (tuning/)

CHAT_TASK = "gpuhost.llava.chat"
IMAGES_TASK = "gpuhost.sd.images"
TRAIN_TASK = "gpuhost.sd.train"

SCHEDULERS = ("euler", "euler_a", "dpmpp_2m", "ddim")

# What a client is told when the worker running its request died (the gateway, when no worker
# came back for it; the next worker, when the first had already answered in part).
WORKER_LOST = "the worker running this request was lost; it was not billed, please retry"

# Statuses of a finished request, as written to its usage record.
COMPLETED, CANCELLED, FAILED, REJECTED = "completed", "cancelled", "failed", "rejected"


class WorkerStatus(BaseModel):
    """What a worker publishes about itself, every second or so (for /api/ps and operators)."""

    # host:pid of the worker process (`owner` before; read too, while a rollout mixes versions)
    process: str = Field(validation_alias=AliasChoices("process", "owner"))
    queue: str
    model: str
    loaded: bool
    expires_at: float | None  # unix time the idle model unloads; None: stays loaded
    parameters: int  # number of weights, 0 when unloaded
    size_bytes: int  # parameters x bytes each, 0 when unloaded
    device: str
    dtype: str
    weights: str = "bf16"  # LLaVA's language model layers: bf16, or fp8 (workers.engines.fp8)
    context_length: int
    load_seconds: float = 0.0  # how long the model's last load took (never billed)
    busy_seconds: float  # device time spent on requests since the process started
    billed_seconds: float  # of which already billed to finished requests
    active: int  # requests running or waiting in the engine
    capacity: int = 0  # requests it takes at once (its request threads); 0: it does not say
    decode_steps: int = 0  # batched decode steps since the process started
    decode_tokens: int = 0  # tokens those steps produced (/ decode_steps: mean batch size)
    prefill_batches: int = 0  # LLaVA prefill forwards (a group of requests arriving together)
    prefill_rows: int = 0  # requests they prefilled (/ prefill_batches: mean group size)
    batches: int = 0  # Stable Diffusion: batches run
    batch_requests: int = 0  # requests they held (/ batches: mean requests per batch)
    # compiled at load: LLaVA's decode step (fixed cache), Stable Diffusion's UNet (warm sizes)
    compiled: bool = False
    # when the served weights last changed (their files' newest mtime, unix time): Ollama's
    # modified_at; 0 from a worker that does not say
    weights_modified_at: float = 0.0
    updated_at: float


def celery_app(name: str, broker_url: str, **options) -> "Celery":
    """A Celery app on the shared settings (`celery_config`): every producer and consumer of
    the job queues makes its own this way (the billing beat, on its own queue, does not)."""
    from celery import Celery

    app = Celery(name)
    app.conf.update(celery_config(broker_url, **options))
    return app


def celery_config(
    broker_url: str, visibility_timeout: float = 120.0, restore_interval: float = 10.0
) -> dict:
    """Celery settings the gateway (producer) and the workers (consumers) share.

    With the Redis broker, a job whose worker died unacknowledged is delivered again once
    `visibility_timeout` has passed (checked every `restore_interval`). A job that is still
    running when that happens is not run twice: its worker holds the job's claim. With
    RabbitMQ, it comes back at once, and every message is published with a confirm.
    """
    transport = {
        "visibility_timeout": visibility_timeout,
        "unacked_restore_interval": restore_interval,
        "unacked_restore_throttle": 1,
    }
    if broker_url.startswith(("amqp", "pyamqp")):
        # Publisher confirms: a job is sent once RabbitMQ has it on disk. Without them a
        # message published just before the broker dies is lost (and its request waits out
        # its queue timeout).
        transport["confirm_publish"] = True
    return {
        "broker_url": broker_url,
        "broker_connection_retry_on_startup": True,
        "broker_transport_options": transport,
        "task_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        # A job is acknowledged when it finishes, and comes back if its worker dies.
        "task_acks_late": True,
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        # After a broker connection is lost with jobs running, Celery shrinks the prefetch
        # count and grows it back as those jobs are acknowledged; they cannot be (their channel
        # is gone), so a worker took no new job after a RabbitMQ restart.
        "worker_enable_prefetch_count_reduction": False,
        "task_routes": {
            CHAT_TASK: {"queue": LLAVA_QUEUE},
            IMAGES_TASK: {"queue": SD_QUEUE},
            TRAIN_TASK: {"queue": TRAIN_QUEUE},
        },
        "worker_hijack_root_logger": False,
    }


CHUNK_FIELD = "c"


class SamplingOptions(BaseModel):
    model_config = ConfigDict(extra="forbid")

    max_tokens: int | None = None  # None: up to the context window (and the worker's cap)
    temperature: float = 0.8
    top_p: float = 0.9
    top_k: int = 40
    seed: int | None = None
    stop: list[str] = Field(default_factory=list)
    # The chosen tokens' log probabilities, each with this many likeliest alternatives (0-20);
    # None: none
    logprobs: int | None = None


class ChatTurn(BaseModel):
    model_config = ConfigDict(extra="forbid")

    # tool: a tool's result (an assistant turn's calls are its content, as api/inputs/tools.py
    # writes them)
    role: Literal["system", "user", "assistant", "tool"]
    content: str
    images: list[str] = Field(default_factory=list)  # base64, already validated by the gateway


class OutputFormat(BaseModel):
    """Structured output: the answer is a JSON object (`json`), or JSON valid against a JSON
    Schema (`json_schema`), decoded under a grammar token by token (`api/inputs/output_format.py`
    checks the schema's keywords; the engine compiles it)."""

    model_config = ConfigDict(extra="forbid")

    kind: Literal["json", "json_schema"]
    schema_text: str | None = None  # the schema, as JSON text
    field: str = "format"  # the request field it came from, for errors


class ToolSpec(BaseModel):
    """A function the model may call (api/inputs/tools.py): shown to it in its prompt."""

    model_config = ConfigDict(extra="forbid")

    name: str
    description: str = ""
    parameters: str  # its JSON schema, as JSON text


class ChatJob(BaseModel):
    """One LLaVA request, as enqueued by the gateway."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID | None
    model: str
    kind: Literal["chat", "generate"]
    messages: list[ChatTurn]
    options: SamplingOptions
    enqueued_at: float  # unix time at the gateway
    # How long the model stays loaded after this request: None the worker's default,
    # negative forever, 0 unload as soon as idle (Ollama's keep_alive).
    keep_alive_seconds: float | None = None
    output_format: OutputFormat | None = None
    tools: list[ToolSpec] = Field(default_factory=list)
    # The prompt as given (its one user turn's text), the chat template not applied: Ollama's
    # raw, OpenAI's /v1/completions. No images.
    raw: bool = False
    # Answers to give (OpenAI's n), each sampled on its own (choice i: seed + i), streamed
    # as choice i; billed together, as one request (workers.choices)
    n: int = Field(1, ge=1)
    # Ollama's context: token ids of an earlier exchange (its prompt and answer, as the
    # `context` of its final chunk), put before this prompt as their text
    context: list[int] = Field(default_factory=list)
    # The request's trace (W3C traceparent and tracestate; empty when none): the worker's
    # span continues it (config/traces.py)
    trace: dict[str, str] = Field(default_factory=dict)

    def keeps_context(self) -> bool:
        """Whether its final chunk gives its `context` (Ollama's /api/generate, not raw)."""
        return self.kind == "generate" and not self.raw


class ImageJob(BaseModel):
    """One Stable Diffusion request: text-to-image, image-to-image (`image`), or inpainting
    (`image` and `mask`, white = repaint); any of them in the style of `style_image`."""

    model_config = ConfigDict(extra="forbid")

    request_id: str
    tenant_id: uuid.UUID
    api_key_id: uuid.UUID | None
    model: str
    kind: Literal["txt2img", "img2img", "inpaint"]
    prompt: str
    negative_prompt: str = ""
    width: int
    height: int
    steps: int
    guidance_scale: float
    scheduler: Literal["euler", "euler_a", "dpmpp_2m", "ddim"]
    seed: int
    n: int
    image: str | None = None  # base64, validated by the gateway
    mask: str | None = None
    strength: float = 0.8
    lora: str | None = None  # an adapter id: its file is `lora_key` in storage
    lora_key: str | None = None
    lora_weight: float = 1.0
    # a reference image (base64, validated by the gateway) whose style applies through the
    # model's IP-Adapter, `style_strength` strongly (0: not at all)
    style_image: str | None = None
    style_strength: float = 0.6
    enqueued_at: float
    trace: dict[str, str] = Field(default_factory=dict)  # as ChatJob's


def send_job(celery, job: "ChatJob | ImageJob") -> None:
    """Enqueue a job on its family's queue, as task id = its request id (blocking: call it
    from a thread). The message's `argsrepr` names the job rather than quoting it: Celery
    would otherwise put up to 1 KiB of the prompt into the message headers, where monitoring
    shows it, and spend the time to render it."""
    images = isinstance(job, ImageJob)
    celery.send_task(
        IMAGES_TASK if images else CHAT_TASK,
        args=[job.model_dump(mode="json")],
        task_id=job.request_id,
        queue=SD_QUEUE if images else LLAVA_QUEUE,
        argsrepr=f"({job.kind} job {job.request_id})",
        kwargsrepr="{}",
    )


def send_training(celery, fine_tune_id: str) -> None:
    """Enqueue a fine-tune for the train workers (blocking: call it from a thread)."""
    celery.send_task(TRAIN_TASK, args=[{"fine_tune_id": fine_tune_id}], queue=TRAIN_QUEUE)


class ProgressChunk(BaseModel):
    type: Literal["progress"] = "progress"
    step: int
    steps: int


class ImagesChunk(BaseModel):
    type: Literal["images"] = "images"
    images: list[str]  # base64 PNGs
    seed: int
    load_seconds: float
    run_seconds: float  # wall time from the batch's start to its end
    queue_seconds: float
    gpu_seconds: float
    batch_images: int  # images in the batch this request ran in


class Logprob(BaseModel):
    """A token, its text (its UTF-8 bytes: a token may hold part of a character) and its log
    probability under the model: the model's distribution with the tokens it may not choose
    (suppressed, or outside a grammar) taken out, before temperature, top-k and top-p."""

    token: str
    logprob: float
    bytes: list[int]


class TokenLogprob(Logprob):
    """A chosen token's, with the likeliest alternatives at its place (the chosen one among
    them if it is one of them), likeliest first."""

    top: list[Logprob] = Field(default_factory=list)


class TokenChunk(BaseModel):
    type: Literal["token"] = "token"
    text: str
    # the tokens `text` came from, when the request asked for log probabilities
    logprobs: list[TokenLogprob] | None = None
    choice: int | None = None  # which of a job's n answers (None: its only one)


def merged(chunks: list[TokenChunk]) -> TokenChunk:
    """Token chunks of one answer as one: their text, and their tokens' log probabilities
    when they carry them (None when none does: they were not asked for)."""
    scored = [chunk.logprobs for chunk in chunks if chunk.logprobs is not None]
    return TokenChunk(
        text="".join(chunk.text for chunk in chunks),
        logprobs=[entry for entries in scored for entry in entries] if scored else None,
        choice=chunks[0].choice if chunks else None,
    )


class DoneChunk(BaseModel):
    type: Literal["done"] = "done"
    done_reason: Literal["stop", "length", "cancelled"]
    # with n answers, how each ended (done_reason is the first's); the counts and times are
    # the job's: the prompt once, every answer's tokens
    choices: list[Literal["stop", "length", "cancelled"]] | None = None
    # for a job that keeps it (ChatJob.keeps_context): its prompt's and answer's token ids,
    # images left out, to send back as a later request's `context`
    context: list[int] | None = None
    prompt_tokens: int
    output_tokens: int
    load_seconds: float
    prompt_eval_seconds: float
    eval_seconds: float
    queue_seconds: float
    gpu_seconds: float


class ErrorChunk(BaseModel):
    type: Literal["error"] = "error"
    status: int  # the HTTP status the gateway should answer with, if the stream has not started
    message: str


Chunk = Annotated[
    TokenChunk | DoneChunk | ErrorChunk | ProgressChunk | ImagesChunk, Field(discriminator="type")
]
_chunk = TypeAdapter(Chunk)


AnyChunk = TokenChunk | DoneChunk | ErrorChunk | ProgressChunk | ImagesChunk


def is_final(chunk: AnyChunk) -> bool:
    return isinstance(chunk, DoneChunk | ErrorChunk | ImagesChunk)


def encode_chunk(chunk: AnyChunk) -> dict[str, str]:
    # a field left out reads back as its default: a token chunk without logprobs stays short
    return {CHUNK_FIELD: chunk.model_dump_json(exclude_none=True)}


def decode_chunk(fields: dict) -> AnyChunk:
    raw = fields.get(CHUNK_FIELD) or fields.get(CHUNK_FIELD.encode())
    if isinstance(raw, bytes):
        raw = raw.decode()
    return _chunk.validate_python(json.loads(raw))
