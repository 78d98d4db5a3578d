"""LLaVA on Hugging Face transformers, with continuous batching: the CPU/dev engine and the
GPU fallback.

One engine thread owns the model. Celery task threads hand it requests (`generate` blocks the
calling thread until its request ends). Between decode steps the engine admits waiting
requests: each is prefilled on its own (images included), then joins the running batch, whose
rows then decode together, one token per row per step, each row streaming, sampling with its
own options and seed, and leaving the batch as soon as it finishes or is cancelled.

Every step's device time is charged to the requests that were in it (`workers.metering`):
a prefill to its request alone, a decode step equally to its rows (one token each).
"""

import base64
import gc
import io
import logging
import queue
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from PIL import Image
from transformers import (
    AutoConfig,
    AutoProcessor,
    GenerationConfig,
    LlavaForConditionalGeneration,
)

from workers.contract import ChatJob
from workers.engines.base import Generation, InvalidRequest, TokenSink
from workers.engines.batch import CACHE, Batch
from workers.engines.device import place
from workers.engines.sampling import Sampler
from workers.engines.text import Detokenizer
from workers.metering import Meter

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.1
IDLE_WAIT_SECONDS = 0.5


def _decode_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


@dataclass(eq=False)
class _Request:
    """One request inside the engine."""

    job: ChatJob
    sink: TokenSink
    inputs: dict
    prompt_tokens: int
    max_new_tokens: int
    sampler: Sampler
    detok: Detokenizer
    done: threading.Event = field(default_factory=threading.Event)
    next_token: int = -1
    output_tokens: int = 0
    started_at: float = 0.0
    first_token_at: float | None = None
    finished_at: float = 0.0
    next_poll: float = 0.0
    reason: str | None = None  # stop | length | cancelled, once finished
    error: BaseException | None = None
    gpu_seconds: float = 0.0
    load_seconds: float = 0.0


class TransformersLlava:
    def __init__(
        self,
        model_name: str,
        path: Path,
        device: str = "auto",
        max_output_tokens: int = 2048,
        max_batch: int = 8,
        keep_alive: float = -1.0,
    ):
        self.model_name = model_name
        self.path = path
        self.device, self.dtype = place(device, torch.bfloat16)
        self.max_output_tokens = max_output_tokens
        self.max_batch = max_batch
        self.keep_alive = keep_alive  # seconds an idle model stays loaded; negative: forever
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        self.config = AutoConfig.from_pretrained(path)
        self.context_window = int(self.config.text_config.max_position_embeddings)
        generation = GenerationConfig.from_pretrained(path)
        self.eos_ids = set(_as_list(generation.eos_token_id))
        self.suppressed = _as_list(generation.suppress_tokens)
        self.meter = Meter()
        self.decode_steps = 0  # batched decode steps run
        self.decode_tokens = 0  # tokens they produced: / decode_steps = mean batch occupancy
        self.model: LlavaForConditionalGeneration | None = None
        self.load_seconds = 0.0
        self.expires_at: float | None = None  # unix time; None: no expiry
        self._waiting: queue.Queue[_Request] = queue.Queue()
        self._batch = Batch()
        self._stopping = threading.Event()
        self._load()
        self._thread = threading.Thread(target=self._run, name="llava-engine", daemon=True)
        self._thread.start()

    def _load(self) -> float:
        """Load the weights; returns how long it took (reported, never billed)."""
        started = time.perf_counter()
        log.info("loading %s from %s on %s", self.model_name, self.path, self.device)
        # Straight onto the device (accelerate's device_map): no second copy in host memory.
        model = LlavaForConditionalGeneration.from_pretrained(
            self.path, dtype=self.dtype, device_map=str(self.device)
        )
        self.model = model.eval()
        self.load_seconds = time.perf_counter() - started
        log.info(
            "loaded %s in %.2fs (context %d, batches of up to %d)",
            self.model_name,
            self.load_seconds,
            self.context_window,
            self.max_batch,
        )
        return self.load_seconds

    def _unload(self) -> None:
        log.info("unloading %s (keep_alive expired)", self.model_name)
        self.model = None
        self.expires_at = None
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def status(self) -> dict:
        """What the worker publishes about this engine (see `workers.contract.WorkerStatus`)."""
        model = self.model
        weights = list(model.parameters()) if model is not None else []
        return {
            "model": self.model_name,
            "loaded": model is not None,
            "expires_at": self.expires_at,
            "parameters": sum(p.numel() for p in weights),
            "size_bytes": sum(p.numel() * p.element_size() for p in weights),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "context_length": self.context_window,
            "load_seconds": self.load_seconds,
            "busy_seconds": self.meter.busy_seconds,
            "billed_seconds": self.meter.billed_seconds,
            "active": self.active(),
            "decode_steps": self.decode_steps,
            "decode_tokens": self.decode_tokens,
        }

    # -- the calling (Celery task) thread ------------------------------------------------------

    def generate(self, job: ChatJob, sink: TokenSink) -> Generation:
        request = self._prepare(job, sink)  # CPU work in the caller's thread: not billed
        self._waiting.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        first = request.first_token_at or request.finished_at
        return Generation(
            done_reason=request.reason,
            prompt_tokens=request.prompt_tokens,
            output_tokens=request.output_tokens,
            prompt_eval_seconds=first - request.started_at,
            eval_seconds=request.finished_at - first,
            gpu_seconds=request.gpu_seconds,
            load_seconds=request.load_seconds,
        )

    def active(self) -> int:
        return len(self._batch) + self._waiting.qsize()

    def close(self) -> None:
        self._stopping.set()
        self._thread.join()

    def _prepare(self, job: ChatJob, sink: TokenSink) -> _Request:
        conversation, images = [], []
        for turn in job.messages:
            parts = [{"type": "image"} for _ in turn.images]
            parts.append({"type": "text", "text": turn.content})
            conversation.append({"role": turn.role, "content": parts})
            images.extend(_decode_image(b64) for b64 in turn.images)
        prompt = self.processor.apply_chat_template(
            conversation, add_generation_prompt=True, tokenize=False
        )
        inputs = self.processor(images=images or None, text=prompt, return_tensors="pt")
        prompt_tokens = int(inputs["input_ids"].shape[1])
        if prompt_tokens >= self.context_window:
            text_tokens = len(self.processor.tokenizer(prompt).input_ids) - len(images)
            raise InvalidRequest(
                f"prompt is {prompt_tokens} tokens (of which {prompt_tokens - text_tokens} for "
                f"{len(images)} image(s)); "
                f"the model's context window is {self.context_window} tokens"
            )
        options = job.options
        room = min(self.max_output_tokens, self.context_window - prompt_tokens)
        wanted = options.max_tokens if options.max_tokens is not None else room
        seed = options.seed if options.seed is not None else random.getrandbits(63)
        return _Request(
            job=job,
            sink=sink,
            inputs=dict(inputs),
            prompt_tokens=prompt_tokens,
            max_new_tokens=max(1, min(wanted, room)),
            sampler=Sampler(options, seed, self.device),
            detok=Detokenizer(
                lambda ids: self.processor.tokenizer.decode(ids, skip_special_tokens=True),
                options.stop,
            ),
        )

    # -- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._admit()
                if len(self._batch):
                    self._decode()
                elif self._expired():
                    self._unload()
            except Exception as exc:  # a failed step fails the requests in it, not the engine
                log.exception("engine step failed; failing %d request(s)", len(self._batch))
                for request in self._batch.rows:
                    self._finish(request, None, error=exc)
                self._batch.keep([])

    def _expired(self) -> bool:
        return (
            self.model is not None
            and self.expires_at is not None
            and time.time() >= self.expires_at
            and self._waiting.empty()
        )

    def _admit(self) -> None:
        while len(self._batch) < self.max_batch:
            try:
                wait = None if len(self._batch) else IDLE_WAIT_SECONDS
                request = self._waiting.get(block=wait is not None, timeout=wait)
            except queue.Empty:
                return
            try:
                if self.model is None:
                    request.load_seconds = self._load()
                self._prefill(request)
            except Exception as exc:
                log.exception("prefill of %s failed", request.job.request_id)
                self._finish(request, None, error=exc)

    @torch.inference_mode()
    def _prefill(self, request: _Request) -> None:
        if request.sink.should_stop():
            self.meter.open(request)
            self._finish(request, "cancelled")
            return
        inputs = {k: v.to(self.device) for k, v in request.inputs.items()}
        if "pixel_values" in inputs:
            inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        self.meter.open(request)
        self._sync()
        request.started_at = time.perf_counter()
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        token = request.sampler(self._logits(out.logits[0, -1]))
        self._sync()
        self.meter.charge(time.perf_counter() - request.started_at, {request: 1.0})
        request.inputs = {}  # the prompt now lives in the KV cache
        if self._accept(request, token):
            self._batch.add(request, getattr(out, CACHE), request.prompt_tokens)

    @torch.inference_mode()
    def _decode(self) -> None:
        batch = self._batch
        self._sync()
        started = time.perf_counter()
        out = self.model(**batch.step_inputs([r.next_token for r in batch.rows]), use_cache=True)
        batch.advanced()
        logits = out.logits[:, -1]
        tokens = [request.sampler(self._logits(logits[i])) for i, request in enumerate(batch.rows)]
        self._sync()
        self.meter.charge(time.perf_counter() - started, {r: 1.0 for r in batch.rows})
        self.decode_steps += 1
        self.decode_tokens += len(batch.rows)
        keep = [i for i, r in enumerate(batch.rows) if self._accept(r, tokens[i])]
        batch.keep(keep)

    def _logits(self, row: torch.Tensor) -> torch.Tensor:
        if self.suppressed:
            row = row.clone()
            row[self.suppressed] = float("-inf")
        return row

    def _accept(self, request: _Request, token: int) -> bool:
        """Take a sampled token; False once the request is finished."""
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
        request.output_tokens += 1
        if token in self.eos_ids:
            self._finish(request, "stop")
            return False
        text = request.detok.push(token)
        if text:
            request.sink.token(text)
        if request.detok.stopped:
            self._finish(request, "stop")
            return False
        if request.output_tokens >= request.max_new_tokens:
            self._flush(request)
            self._finish(request, "length")
            return False
        if now >= request.next_poll:
            request.next_poll = now + CANCEL_POLL_SECONDS
            if request.sink.should_stop():
                self._finish(request, "cancelled")
                return False
        request.next_token = token
        return True

    def _flush(self, request: _Request) -> None:
        text = request.detok.flush()
        if text:
            request.sink.token(text)

    def _finish(self, request: _Request, reason: str | None, error: BaseException | None = None):
        if reason == "stop" and not request.detok.stopped:
            self._flush(request)
        request.reason = reason
        request.error = error
        request.finished_at = time.perf_counter()
        request.gpu_seconds = self.meter.close(request) if error is None else self._drop(request)
        keep_alive = request.job.keep_alive_seconds
        keep_alive = self.keep_alive if keep_alive is None else keep_alive
        self.expires_at = None if keep_alive < 0 else time.time() + keep_alive
        request.done.set()

    def _drop(self, request: _Request) -> float:
        try:
            return self.meter.close(request)
        except KeyError:  # failed before it was ever charged
            return 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
