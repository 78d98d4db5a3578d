"""LLaVA on Hugging Face transformers, with continuous batching: the CPU/dev engine and the
GPU fallback.

One engine thread owns the model. Celery task threads hand it requests (`generate` blocks the
calling thread until its request ends). Between decode steps the engine admits waiting
requests while rows are free and prefills them in groups (`workers.engines.prefill`): one
forward pass of at most `prefill_tokens` padded tokens, images included, per decode step, so
that a burst neither waits for one prefill after another nor stalls running streams for long.
A prefilled request joins the running batch, whose rows decode together, one token per row
per step, each streaming, sampling with its own options and seed, and leaving as soon as it
finishes or is cancelled.

Decode steps run over one of two caches with the same contract: on a GPU, `FixedCache`, a KV
cache allocated at load with every step's shape captured as a CUDA graph
(`workers.engines.kv_cache`); on the CPU (or with `decode="dynamic"`), `GrowingCache`, a cache
that grows with the sequences (`workers.engines.growing_cache`).

Decode steps are pipelined (`workers.engines.llava_decode`).

Every step's device time is charged to the requests that were in it (`workers.metering`):
a prefill to the requests of its group by their prompts' tokens, a decode step equally to its
live rows (one token each). On a GPU a step's time is read from CUDA events around it, so it
is the device's time, however the CPU's work overlapped it.
"""

import gc
import logging
import queue
import threading
import time
from pathlib import Path

import torch
from transformers import (
    AutoConfig,
    AutoProcessor,
    GenerationConfig,
    LlavaForConditionalGeneration,
)

from workers.contract import ChatJob
from workers.engines import fp8
from workers.engines.base import Generation, TokenSink
from workers.engines.device import Step, place
from workers.engines.grammar import Grammars
from workers.engines.growing_cache import GrowingCache
from workers.engines.kv_cache import FixedCache, decode_batch
from workers.engines.llava_decode import PipelinedDecode
from workers.engines.llava_requests import Request, prepare
from workers.engines.logprobs import Speller, score
from workers.engines.prefill import GroupedPrefill
from workers.engines.sampling import pick
from workers.metering import Meter

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.1
IDLE_WAIT_SECONDS = 0.5
# Padded prompt tokens (rows x the group's longest prompt) one prefill forward takes at most;
# a longer prompt goes alone. One image is 576 tokens: 8 requests of a 622-token prompt fit.
PREFILL_TOKENS = 8192


def idle_time(operator: float, asked: float | None) -> float:
    """How long the model stays loaded once idle (negative: for as long as the worker runs).
    The model is every tenant's: the operator's setting governs, and a request's keep_alive
    (Ollama's) is a hint that may keep it loaded longer, never unload it sooner, nor pin it
    for good."""
    if asked is None or operator < 0 or asked < 0:
        return operator
    return max(operator, asked)


class TransformersLlava(GroupedPrefill, PipelinedDecode):
    def __init__(
        self,
        model_name: str,
        path: Path,
        device: str = "auto",
        max_output_tokens: int = 2048,
        max_batch: int = 8,
        keep_alive: float = -1.0,
        decode: str = "auto",
        prefill_tokens: int = PREFILL_TOKENS,
        weights: str = "bf16",
        compile: str = "auto",
    ):
        self.model_name = model_name
        self.path = path
        self.device, self.dtype = place(device, torch.bfloat16)
        self.max_output_tokens = max_output_tokens
        self.max_batch = max_batch
        self.keep_alive = keep_alive  # seconds an idle model stays loaded; negative: forever
        if prefill_tokens < 1:
            raise ValueError(f"prefill_tokens must be at least 1, not {prefill_tokens}")
        self.prefill_tokens = prefill_tokens
        _one_of("weights", weights, ("bf16", "fp8"))
        _one_of("compile", compile, ("auto", "on", "off"))
        _one_of("decode", decode, ("auto", "fixed", "dynamic"))
        if weights == "fp8" and (why := fp8.supported(self.device)) is not None:
            raise ValueError(f"{why}: set GPUHOST_LLAVA_WEIGHTS=bf16 for this device")
        self.weights = weights  # the language model's linear layers (workers.engines.fp8)
        # the fixed cache's decode step compiled at load (auto: on a GPU; on the CPU, Inductor's
        # code for the symbolic shapes is slower than eager)
        self.compile = self.device.type == "cuda" if compile == "auto" else compile == "on"
        # auto: fixed (static cache, CUDA graphs) on a GPU; the growing cache on the CPU.
        self._decode_choice = decode
        self.decode = (
            ("fixed" if self.device.type == "cuda" else "dynamic") if decode == "auto" else decode
        )
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
        self.pad_id = self.processor.tokenizer.pad_token_id or 0  # masked: any id will do
        self.config = AutoConfig.from_pretrained(path)
        self.context_window = int(self.config.text_config.max_position_embeddings)
        generation = GenerationConfig.from_pretrained(path)
        self.eos_ids = set(_as_list(generation.eos_token_id))
        self.suppressed = torch.tensor(
            _as_list(generation.suppress_tokens), dtype=torch.long, device=self.device
        )
        vocabulary = int(self.config.text_config.vocab_size)
        self.grammars = Grammars(self.processor.tokenizer, vocabulary, self.eos_ids)
        self.speller = Speller(self.processor.tokenizer)
        self.meter = Meter()
        self.decode_steps = 0  # batched decode steps run
        self.decode_tokens = 0  # tokens they produced: / decode_steps = mean batch occupancy
        self.prefill_batches = 0  # prefill forwards run
        self.prefill_rows = 0  # requests they prefilled: / prefill_batches = mean group
        self.model: LlavaForConditionalGeneration | None = None
        self.load_seconds = 0.0
        self.expires_at: float | None = None  # unix time; None: no expiry
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._admitted: list[Request] = []  # taken from the queue, rows kept for them, to prefill
        self._batch: GrowingCache | FixedCache | None = None  # made with the model
        self._inflight: Step | None = None  # launched, tokens not yet handed out
        self._next: torch.Tensor | None = None  # the batch rows' next input tokens (device)
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
        if self.weights == "fp8":
            replaced = fp8.to_float8(model)
            log.info("%d linear layers of the language model in float8", replaced)
            if self.device.type == "cuda":
                torch.cuda.empty_cache()  # the bf16 weights they replaced
        self.model = model.eval()
        self._batch = decode_batch(
            model,
            self.decode,
            self._decode_choice,
            self.max_batch,
            self.context_window,
            compiled=self.compile,
        )
        self.load_seconds = time.perf_counter() - started
        log.info(
            "loaded %s in %.2fs (context %d, batches of up to %d, %s decode)",
            self.model_name,
            self.load_seconds,
            self.context_window,
            self.max_batch,
            "fixed" if isinstance(self._batch, FixedCache) else "dynamic",
        )
        return self.load_seconds

    def _unload(self) -> None:
        log.info("unloading %s (keep_alive expired)", self.model_name)
        self.model = None
        self._batch = None
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
            "weights": self.weights,
            "context_length": self.context_window,
            "load_seconds": self.load_seconds,
            "busy_seconds": self.meter.busy_seconds,
            "billed_seconds": self.meter.billed_seconds,
            "active": self.active(),
            "decode": self.decode,
            "compiled": bool(getattr(self._batch, "compiled", False)),
            "decode_steps": self.decode_steps,
            "decode_tokens": self.decode_tokens,
            "prefill_batches": self.prefill_batches,
            "prefill_rows": self.prefill_rows,
        }

    # -- the calling (Celery task) thread ------------------------------------------------------

    def generate(self, job: ChatJob, sink: TokenSink) -> Generation:
        # CPU work in the caller's thread: not billed
        request = prepare(
            job,
            sink,
            self.processor,
            self.context_window,
            self.max_output_tokens,
            self.device,
            self.grammars,
        )
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
            context=None if request.context is None else request.context + tuple(request.detok.ids),
        )

    def active(self) -> int:
        return self._rows() + len(self._admitted) + self._waiting.qsize()

    def _rows(self) -> int:
        batch = self._batch
        return 0 if batch is None else len(batch)

    def close(self) -> None:
        self._stopping.set()
        self._thread.join()

    # -- the engine thread -----------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            try:
                self._admit()
                self._prefill_next()
                if self._rows() or self._inflight is not None:
                    self._decode()
                elif self._expired():
                    self._unload()
            except Exception as exc:  # a failed step fails the requests in it, not the engine
                log.exception("engine step failed; failing %d request(s)", self._rows())
                self._inflight = self._next = None
                if self._batch is not None:
                    for request in self._batch.rows:
                        if not request.done.is_set():
                            self._finish(request, None, error=exc)
                    self._batch.keep([])

    def _expired(self) -> bool:
        return (
            self.model is not None
            and self.expires_at is not None
            and time.time() >= self.expires_at
            and self._waiting.empty()
            and not self._admitted
        )

    def _admit(self) -> None:
        """Take waiting requests while rows are free (loading the model if it was unloaded);
        a request cancelled while it waited ends here, never prefilled."""
        while self._rows() + len(self._admitted) < self.max_batch:
            try:
                busy = self._rows() or self._inflight is not None or self._admitted
                wait = None if busy else IDLE_WAIT_SECONDS
                request = self._waiting.get(block=wait is not None, timeout=wait)
            except queue.Empty:
                return
            try:
                if self.model is None:
                    request.load_seconds = self._load()
            except Exception as exc:
                log.exception("loading the model for %s failed", request.job.request_id)
                self._finish(request, None, error=exc)
                continue
            if request.sink.should_stop():
                self.meter.open(request)
                self._finish(request, "cancelled")
                continue
            self._admitted.append(request)

    def _choose(self, rows: list[Request], logits: torch.Tensor):
        """Each row's next token (on the device), suppressed tokens never chosen but by a row
        with a grammar (which allows the stop tokens exactly when its answer is complete);
        and their log probabilities, if a row asked for them."""
        self.grammars.constrain(logits, [r.matcher for r in rows], self.suppressed)
        tokens = pick([r.sampler for r in rows], logits)
        return tokens, score([r.job.options.logprobs for r in rows], logits, tokens)

    def _accept(self, request: Request, token: int, scores=None, row: int = 0) -> bool:
        """Take a sampled token; False once the request is finished."""
        now = time.perf_counter()
        if request.first_token_at is None:
            request.first_token_at = now
        request.output_tokens += 1
        if token in self.eos_ids:
            self._finish(request, "stop")
            return False
        if request.matcher is not None and not request.matcher.consume_token(token):
            self._finish(request, None, error=RuntimeError(f"the grammar refused token {token}"))
            return False
        alternatives = request.job.options.logprobs
        if alternatives is not None:
            request.scored.append(self.speller.entry(scores, row, token, alternatives))
        request.emit(request.detok.push(token))
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
        return True

    def _flush(self, request: Request) -> None:
        request.emit(request.detok.flush())

    def _finish(self, request: Request, reason: str | None, error: BaseException | None = None):
        if reason == "stop" and not request.detok.stopped:
            self._flush(request)
        request.reason = reason
        request.error = error
        request.finished_at = time.perf_counter()
        request.gpu_seconds = self.meter.close(request) if error is None else self._drop(request)
        keep_alive = idle_time(self.keep_alive, request.job.keep_alive_seconds)
        self.expires_at = None if keep_alive < 0 else time.time() + keep_alive
        request.done.set()

    def _drop(self, request: Request) -> float:
        try:
            return self.meter.close(request)
        except KeyError:  # failed before it was ever charged
            return 0.0

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)


def _one_of(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(
            f"{name} must be {', '.join(allowed[:-1])} or {allowed[-1]}, not {value!r}"
        )


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
