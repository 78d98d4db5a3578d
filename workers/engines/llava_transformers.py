"""LLaVA on Hugging Face transformers, with continuous batching: the CPU/dev engine and the
GPU fallback.

One engine thread owns the model. Celery task threads hand it requests (`generate` blocks the
calling thread until its request ends). Between decode steps the engine admits waiting
requests: each is prefilled on its own (images included), then joins the running batch, whose
rows then decode together, one token per row per step, each row streaming, sampling with its
own options and seed, and leaving the batch as soon as it finishes or is cancelled.

Decode steps run over one of two batches with the same contract: on a GPU, `SlotBatch`, a KV
cache allocated at load with every step's shape captured as a CUDA graph
(`workers.engines.kv_cache`); on the CPU (or with `decode="dynamic"`), `Batch`, a cache that grows
with the sequences (`workers.engines.batch`).

Decode steps are pipelined: the engine launches step t+1 (its input, step t's sampled tokens,
never leaves the device) before it waits for step t's tokens and hands them to the requests,
so detokenising, streaming and the step's bookkeeping run on the CPU while the device computes.
A row that finished at step t rode along in step t+1 for nothing; that step's time is charged
to the rows still live in it, and a step whose rows had all finished is billed to nobody and
not counted as busy time.

Every step's device time is charged to the requests that were in it (`workers.metering`):
a prefill to its request alone, a decode step equally to its live rows (one token each). On a
GPU a step's time is read from CUDA events around it, so it is the device's time, however the
CPU's work overlapped it.
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
from workers.engines.base import Generation, TokenSink
from workers.engines.batch import CACHE, Batch
from workers.engines.device import Step, clock, place, to_device
from workers.engines.grammar import Grammars
from workers.engines.kv_cache import SlotBatch, decode_batch
from workers.engines.llava_requests import Request, prepare
from workers.engines.logprobs import Speller, score
from workers.engines.sampling import pick
from workers.metering import Meter

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.1
IDLE_WAIT_SECONDS = 0.5


class TransformersLlava:
    def __init__(
        self,
        model_name: str,
        path: Path,
        device: str = "auto",
        max_output_tokens: int = 2048,
        max_batch: int = 8,
        keep_alive: float = -1.0,
        decode: str = "auto",
    ):
        self.model_name = model_name
        self.path = path
        self.device, self.dtype = place(device, torch.bfloat16)
        self.max_output_tokens = max_output_tokens
        self.max_batch = max_batch
        self.keep_alive = keep_alive  # seconds an idle model stays loaded; negative: forever
        if decode not in ("auto", "slots", "dynamic"):
            raise ValueError(f"decode must be auto, slots or dynamic, not {decode!r}")
        # auto: slots (static cache, CUDA graphs) on a GPU; the growing cache on the CPU.
        self._decode_choice = decode
        self.decode = (
            ("slots" if self.device.type == "cuda" else "dynamic") if decode == "auto" else decode
        )
        self.processor = AutoProcessor.from_pretrained(path)
        self.processor.tokenizer.padding_side = "left"
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
        self.model: LlavaForConditionalGeneration | None = None
        self.load_seconds = 0.0
        self.expires_at: float | None = None  # unix time; None: no expiry
        self._waiting: queue.Queue[Request] = queue.Queue()
        self._batch: Batch | SlotBatch | None = None  # made with the model
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
        self.model = model.eval()
        self._batch = decode_batch(
            model, self.decode, self._decode_choice, self.max_batch, self.context_window
        )
        self.load_seconds = time.perf_counter() - started
        log.info(
            "loaded %s in %.2fs (context %d, batches of up to %d, %s decode)",
            self.model_name,
            self.load_seconds,
            self.context_window,
            self.max_batch,
            "slot" if isinstance(self._batch, SlotBatch) else "dynamic",
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
            "context_length": self.context_window,
            "load_seconds": self.load_seconds,
            "busy_seconds": self.meter.busy_seconds,
            "billed_seconds": self.meter.billed_seconds,
            "active": self.active(),
            "decode": self.decode,
            "decode_steps": self.decode_steps,
            "decode_tokens": self.decode_tokens,
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
        return self._rows() + self._waiting.qsize()

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
        )

    def _admit(self) -> None:
        while self._rows() < self.max_batch:
            try:
                busy = self._rows() or self._inflight is not None
                wait = None if busy else IDLE_WAIT_SECONDS
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
    def _prefill(self, request: Request) -> None:
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
        first, scores = self._choose([request], out.logits[:, -1].float())
        token = int(first[0])
        self._sync()
        self.meter.charge(time.perf_counter() - request.started_at, {request: 1.0})
        request.inputs = {}  # the prompt now lives in the KV cache
        if self._accept(request, token, scores):
            self._batch.add(request, getattr(out, CACHE), request.prompt_tokens)
            self._next = first if self._next is None else torch.cat([self._next, first])

    @torch.inference_mode()
    def _decode(self) -> None:
        """Launch the next step (if a row needs one), then finish the one before it. A row
        with a grammar needs its last token before its next can be chosen: with one in the
        batch, the step before is finished while the next one's forward pass runs (on a GPU;
        on the CPU nothing would overlap, so it is finished first)."""
        batch = self._batch
        constrained = any(r.matcher is not None for r in batch.rows)
        if constrained and self.device.type != "cuda" and self._inflight is not None:
            self._complete(self._inflight)
            self._inflight = None
            self._drop_finished(batch)
        needed = any(1 + r.launched < r.max_new_tokens for r in batch.rows)
        # (with nothing in flight a row always needs one: its tokens are all handed out)
        launch = batch.rows and (needed or self._inflight is None)
        completing = self._inflight if constrained and launch else None
        step = self._launch(batch, completing) if launch else None
        if self._inflight is not None and completing is None:
            self._complete(self._inflight)
        self._inflight = step
        self._drop_finished(batch)

    def _drop_finished(self, batch: Batch | SlotBatch) -> None:
        keep = [i for i, r in enumerate(batch.rows) if not r.done.is_set()]
        if len(keep) < len(batch.rows):
            batch.keep(keep)
            self._next = self._next[to_device(keep, self.device)] if keep else None

    def _launch(self, batch: Batch | SlotBatch, completing: Step | None = None) -> Step:
        """Run a decode step over the batch and choose its tokens. `completing`: the step
        before, finished after this one's forward pass is launched and before its tokens are
        chosen (its tokens reach the rows' grammars)."""
        rows = list(batch.rows)
        started = clock(self.device)
        logits = batch.step(self._next)
        if completing is not None:
            self._complete(completing)
        tokens, scores = self._choose(rows, logits)
        host = tokens.to("cpu", non_blocking=True) if self.device.type == "cuda" else tokens
        for request in rows:
            request.launched += 1
        self._next = tokens
        scores = scores.to_host() if scores is not None else None
        return Step(rows, tokens, host, started, clock(self.device), scores)

    def _complete(self, step: Step) -> None:
        """Wait for a step's tokens; charge its time to its live rows, hand them their tokens."""
        step.wait()
        live = [r for r in step.rows if not r.done.is_set()]
        if live:  # a step of rows that had all finished was waste: nobody is billed for it
            self.meter.charge(step.seconds(), {r: 1.0 for r in live})
            self.decode_steps += 1
            self.decode_tokens += len(live)
        for row, (request, token) in enumerate(zip(step.rows, step.host.tolist(), strict=True)):
            if not request.done.is_set():
                self._accept(request, token, step.scores, row)

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
        keep_alive = request.job.keep_alive_seconds
        keep_alive = self.keep_alive if keep_alive is None else keep_alive
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


def _as_list(value) -> list[int]:
    if value is None:
        return []
    return list(value) if isinstance(value, list | tuple) else [value]
