"""What the OpenAI-style routes answer, as models: each route declares its own, so
/openapi.json documents it (and a route that returns a dict is checked against it). Lists are
`Page`s; times are whole Unix seconds; `gpu_seconds` is to the millisecond, as billed; the
time a request waited is `queue_seconds`."""

from typing import Any, Generic, Literal, TypeVar

from pydantic import BaseModel, ConfigDict

T = TypeVar("T")


class Page(BaseModel, Generic[T]):
    """A list: a page of objects, the first and last ids (the next page starts `after` the
    last), and whether more follow."""

    object: Literal["list"]
    data: list[T]
    first_id: str | None
    last_id: str | None
    has_more: bool


class Model(BaseModel):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    kind: Literal["chat", "image"]  # which routes take it: chat and completions, or images


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    expires_at: int | None
    filename: str
    purpose: Literal["batch", "batch_output", "fine-tune", "user_data"]
    status: Literal["processed"]
    status_details: None


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


class RequestCounts(BaseModel):
    total: int
    completed: int
    failed: int


class Batch(BaseModel):
    id: str
    object: Literal["batch"]
    endpoint: str | None  # None: a batch sent as a file whose lines name their own
    errors: None
    input_file_id: str | None
    completion_window: Literal["24h"]
    status: Literal["in_progress", "finalizing", "completed", "expired", "cancelling", "cancelled"]
    output_file_id: str | None
    error_file_id: str | None
    created_at: int | None
    in_progress_at: int | None
    expires_at: int | None
    finalizing_at: int | None
    completed_at: int | None
    failed_at: int | None
    expired_at: int | None
    cancelling_at: int | None
    cancelled_at: int | None
    finished_at: int | None
    request_counts: RequestCounts
    metadata: dict[str, str] | None
    output_url: str | None  # every line's result in input order, once it ended


class Job(BaseModel):
    """An asynchronous job (`/v1/jobs`)."""

    model_config = ConfigDict(extra="allow")

    id: str
    type: Literal["chat", "images"]
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: int
    submitted_at: int | None
    started_at: int | None
    finished_at: int | None
    progress: dict[str, Any] | None
    output: dict[str, Any] | None
    error: str | None
    gpu_seconds: float | None
    queue_seconds: float | None
    queue_position: int | None
    estimated_start_seconds: float | None


class CompletionUsage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    gpu_seconds: float
    queue_seconds: float


class ChatMessage(BaseModel):
    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class ChatChoice(BaseModel):
    index: int
    message: ChatMessage
    finish_reason: Literal["stop", "length", "tool_calls"]
    logprobs: dict[str, Any] | None


class ChatCompletion(BaseModel):
    """A non-streamed answer; streamed (`stream: true`), `chat.completion.chunk` events."""

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: CompletionUsage


class CompletionChoice(BaseModel):
    text: str
    index: int
    logprobs: dict[str, Any] | None
    finish_reason: Literal["stop", "length"] | None


class Completion(BaseModel):
    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: CompletionUsage


class Image(BaseModel):
    b64_json: str | None = None
    url: str | None = None


class ImagesResponse(BaseModel):
    created: int
    data: list[Image]
    gpu_seconds: float


class TrainingProgress(BaseModel):
    step: int
    steps: int
    loss: float | None


class Checkpoint(BaseModel):
    step: int
    from_step: int
    loss: float | None
    gpu_seconds: float


class FineTuningJob(BaseModel):
    """A LoRA fine-tune of Stable Diffusion on the tenant's images (`/v1/fine_tuning/jobs`:
    this server's own, not OpenAI's text fine-tuning)."""

    id: str
    object: Literal["fine_tuning.job"]
    model: str
    status: Literal["queued", "running", "succeeded", "failed", "cancelled"]
    created_at: int | None
    started_at: int | None
    finished_at: int | None
    params: dict[str, Any]
    dataset: dict[str, int]
    progress: TrainingProgress
    checkpoint_step: int
    attempts: int
    gpu_seconds: float
    adapter_id: str | None
    error: str | None
    checkpoints: list[Checkpoint] | None = None  # one job's view only


class Adapter(BaseModel):
    id: str
    object: Literal["adapter"]
    model: str
    fine_tune_id: str | None
    rank: int
    bytes: int
    created_at: int | None


class AdapterDeleted(BaseModel):
    id: str
    object: Literal["adapter"]
    deleted: bool


class WebhookSecret(BaseModel):
    key: str


class WebhookDelivery(BaseModel):
    id: str
    event: Literal["start", "completed"]
    url: str
    status: Literal["pending", "delivered", "failed"]
    attempts: int
    last_status_code: int | None
    last_error: str | None
    created_at: int
    delivered_at: int | None
