"""LLaVA on vLLM's async engine: the production engine on GPUs.

vLLM batches continuously by itself; this adapter feeds it from Celery task threads through
an asyncio loop of its own, streams each request's deltas, aborts a request whose client went
away, and meters from vLLM's outputs (`workers.metering.WindowMeter`): vLLM gives no
per-request device time, so busy time (while it holds requests) is split by tokens processed
in each window. Sums still equal busy time.

Images are passed as `multi_modal_data`; the prompt is the model's own chat template with
one image placeholder per image. A text-only model (no image processor) serves text turns.
"""

import asyncio
import base64
import io
import logging
import random
import threading
import time
from dataclasses import dataclass
from pathlib import Path

from PIL import Image
from transformers import AutoConfig, AutoProcessor
from vllm import AsyncEngineArgs, SamplingParams
from vllm.config import StructuredOutputsConfig
from vllm.exceptions import VLLMClientError
from vllm.sampling_params import RequestOutputKind, StructuredOutputsParams
from vllm.v1.engine.async_llm import AsyncLLM

from workers.contract import ChatJob, Logprob, TokenLogprob
from workers.engines.base import Generation, InvalidRequest, TokenSink
from workers.engines.chat_prompt import context_ids, prompt_text
from workers.metering import WindowMeter

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.1
IMAGE_PLACEHOLDER = "<image>"


@dataclass(frozen=True)
class VllmOptions:
    gpu_memory_utilization: float = 0.9
    max_model_len: int | None = None
    dtype: str = "auto"
    enforce_eager: bool = False


def _decode_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


class VllmLlava:
    def __init__(
        self,
        model_name: str,
        path: Path,
        max_output_tokens: int = 2048,
        max_batch: int = 64,
        options: VllmOptions | None = None,
    ):
        options = options or VllmOptions()
        self.model_name = model_name
        self.path = path
        self.max_output_tokens = max_output_tokens
        self.processor = AutoProcessor.from_pretrained(path)
        config = AutoConfig.from_pretrained(path)
        self.vision = hasattr(config, "vision_config")
        text_config = config.get_text_config()
        self.context_window = options.max_model_len or int(text_config.max_position_embeddings)
        self.meter = WindowMeter()
        self._active = 0
        started = time.perf_counter()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="vllm", daemon=True)
        self._thread.start()
        args = AsyncEngineArgs(
            model=str(path),
            max_model_len=self.context_window,
            max_num_seqs=max_batch,
            gpu_memory_utilization=options.gpu_memory_utilization,
            dtype=options.dtype,
            enforce_eager=options.enforce_eager,
            limit_mm_per_prompt={"image": 8} if self.vision else None,
            # structured output as in the transformers engine: llguidance, compact JSON (a
            # keyword it cannot enforce is refused; xgrammar ignores some, and lets control
            # characters into strings)
            structured_outputs_config=StructuredOutputsConfig(
                backend="guidance", disable_any_whitespace=True
            ),
        )

        async def start() -> AsyncLLM:
            return AsyncLLM.from_engine_args(args)

        self.engine = self._call(start())
        self.load_seconds = time.perf_counter() - started
        log.info("vLLM loaded %s in %.1fs", model_name, self.load_seconds)

    def _call(self, coroutine):
        return asyncio.run_coroutine_threadsafe(coroutine, self._loop).result()

    # -- ChatEngine ------------------------------------------------------------------------------

    def generate(self, job: ChatJob, sink: TokenSink) -> Generation:
        prompt = self._prompt(job)
        return self._call(self._generate(job, prompt, sink))

    def status(self) -> dict:
        return {
            "model": self.model_name,
            "loaded": True,
            "expires_at": None,
            "parameters": 0,
            "size_bytes": 0,
            "device": "cuda",
            "dtype": "auto",
            "context_length": self.context_window,
            "load_seconds": self.load_seconds,
            "busy_seconds": self.meter.meter.busy_seconds,
            "billed_seconds": self.meter.meter.billed_seconds,
            "active": self._active,
        }

    def close(self) -> None:
        self.engine.shutdown()
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join()

    # -- internals -------------------------------------------------------------------------------

    def _prompt(self, job: ChatJob) -> dict:
        conversation, images = [], []
        for turn in job.messages:
            if turn.images and not self.vision:
                raise InvalidRequest(f"model '{self.model_name}' does not accept images")
            parts = [{"type": "image"} for _ in turn.images]
            parts.append({"type": "text", "text": turn.content})
            content = parts if self.vision else turn.content
            conversation.append({"role": turn.role, "content": content})
            images.extend(_decode_image(b64) for b64 in turn.images)
        prompt: dict = {"prompt": prompt_text(self.processor, conversation, job)}
        if images:
            prompt["multi_modal_data"] = {"image": images}
        return prompt

    def _sampling(self, job: ChatJob) -> SamplingParams:
        options = job.options
        structured = None
        if job.output_format is not None:  # vLLM's own structured output, compact JSON
            fmt = job.output_format
            schema = fmt.schema_text if fmt.kind == "json_schema" else '{"type": "object"}'
            structured = StructuredOutputsParams(json=schema)
        return SamplingParams(
            n=1,
            temperature=max(0.0, options.temperature),
            top_p=options.top_p if options.temperature > 0 else 1.0,
            top_k=options.top_k if options.temperature > 0 else 0,
            seed=options.seed if options.seed is not None else random.getrandbits(63),
            max_tokens=min(options.max_tokens or self.max_output_tokens, self.max_output_tokens),
            stop=options.stop or None,
            output_kind=RequestOutputKind.DELTA,
            structured_outputs=structured,
            logprobs=options.logprobs,
        )

    async def _generate(self, job: ChatJob, prompt: dict, sink: TokenSink) -> Generation:
        request_id = job.request_id
        params = self._sampling(job)
        started = time.perf_counter()
        self.meter.start(request_id, started)
        self._active += 1
        first_at, prompt_tokens, output_tokens, reason = None, 0, 0, "stop"
        pending: list[TokenLogprob] = []  # log probabilities of tokens whose text is not out
        context: list[int] = []  # the prompt's and answer's ids, for a job that keeps them
        next_poll = 0.0
        try:
            async for out in self.engine.generate(prompt, params, request_id):
                now = time.perf_counter()
                completion = out.outputs[0]
                work = len(completion.token_ids)
                if first_at is None:
                    first_at = now
                    prompt_tokens = len(out.prompt_token_ids or [])
                    work += prompt_tokens
                    context.extend(out.prompt_token_ids or [])
                context.extend(completion.token_ids)
                output_tokens += len(completion.token_ids)
                self.meter.output(request_id, work, now)
                if job.options.logprobs is None:
                    if completion.text:
                        sink.token(completion.text)
                else:  # a token held back (part of a character) comes with the text it makes
                    pending += scored(completion, job.options.logprobs)
                    if completion.text:
                        sink.token(completion.text, logprobs=pending)
                        pending = []
                if out.finished:
                    reason = "length" if completion.finish_reason == "length" else "stop"
                    break
                if now >= next_poll:
                    next_poll = now + CANCEL_POLL_SECONDS
                    if sink.should_stop():
                        await self.engine.abort(request_id)
                        reason = "cancelled"
                        break
        except (ValueError, VLLMClientError) as exc:  # a prompt past the window, a bad schema
            self.meter.finish(request_id, time.perf_counter())
            self._active -= 1
            fmt = job.output_format
            if fmt is not None and "grammar" in str(exc).lower() + type(exc).__name__.lower():
                raise InvalidRequest(
                    f"field '{fmt.field}': the JSON schema cannot be used: {exc}"
                ) from exc
            raise InvalidRequest(
                f"{exc} (the model's context window is {self.context_window} tokens)"
            ) from exc
        finished = time.perf_counter()
        gpu_seconds = self.meter.finish(request_id, finished)
        self._active -= 1
        first_at = first_at or finished
        return Generation(
            done_reason=reason,
            prompt_tokens=prompt_tokens,
            output_tokens=output_tokens,
            prompt_eval_seconds=first_at - started,
            eval_seconds=finished - first_at,
            gpu_seconds=gpu_seconds,
            context=context_ids(self.processor, context) if job.keeps_context() else None,
        )


def scored(completion, alternatives: int) -> list[TokenLogprob]:
    """A delta's tokens with their log probabilities as vLLM gives them (each token's own and
    its likeliest alternatives', by rank)."""
    entries = []
    for token, given in zip(completion.token_ids, completion.logprobs or [], strict=False):
        ranked = sorted((found.rank, t) for t, found in given.items() if found.rank <= alternatives)
        chosen = _spelt(given[token])
        top = [_spelt(given[t]) for _, t in ranked]
        entries.append(TokenLogprob(**chosen.model_dump(), top=top))
    return entries


def _spelt(found) -> Logprob:
    text = found.decoded_token or ""
    return Logprob(token=text, logprob=found.logprob, bytes=list(text.encode()))
