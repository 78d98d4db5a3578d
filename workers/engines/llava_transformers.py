"""LLaVA on Hugging Face transformers: the CPU/dev engine and the GPU fallback.

This engine runs one request at a time on the resident model (a lock serialises them), so
the GPU-seconds of a request are simply the time it held the model.
"""

import base64
import io
import logging
import random
import threading
import time
from pathlib import Path

import torch
from PIL import Image
from transformers import AutoProcessor, LlavaForConditionalGeneration, StoppingCriteria
from transformers.generation.streamers import BaseStreamer

from workers.contract import ChatJob
from workers.engines.base import Generation, InvalidRequest, TokenSink
from workers.engines.text import Detokenizer

log = logging.getLogger(__name__)

CANCEL_POLL_SECONDS = 0.1


def pick_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(name)


def _decode_image(data: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert("RGB")


class _Stream(BaseStreamer, StoppingCriteria):
    """Receives generated ids from `generate`, forwards text, and says when to stop."""

    def __init__(self, detok: Detokenizer, sink: TokenSink, eos_ids: set[int]):
        self._detok = detok
        self._sink = sink
        self._eos = eos_ids
        self._prompt_seen = False
        self._next_poll = 0.0
        self.first_token_at: float | None = None
        self.count = 0
        self.eos_seen = False
        self.cancelled = False

    def put(self, value: torch.Tensor) -> None:
        if not self._prompt_seen:  # generate() first hands over the prompt ids
            self._prompt_seen = True
            return
        for token_id in value.reshape(-1).tolist():
            if self.first_token_at is None:
                self.first_token_at = time.perf_counter()
            self.count += 1
            if token_id in self._eos:
                self.eos_seen = True
                continue
            text = self._detok.push(token_id)
            if text:
                self._sink.token(text)

    def end(self) -> None:
        text = self._detok.flush()
        if text:
            self._sink.token(text)

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs) -> torch.Tensor:
        now = time.perf_counter()
        if now >= self._next_poll:
            self._next_poll = now + CANCEL_POLL_SECONDS
            self.cancelled = self.cancelled or self._sink.should_stop()
        stop = self._detok.stopped or self.cancelled
        return torch.full((input_ids.shape[0],), stop, dtype=torch.bool, device=input_ids.device)


class TransformersLlava:
    def __init__(
        self, model_name: str, path: Path, device: str = "auto", max_output_tokens: int = 2048
    ):
        self.model_name = model_name
        self.device = pick_device(device)
        self.max_output_tokens = max_output_tokens
        started = time.perf_counter()
        log.info("loading %s from %s on %s", model_name, path, self.device)
        dtype = torch.bfloat16 if self.device.type == "cuda" else torch.float32
        self.processor = AutoProcessor.from_pretrained(path)
        self.model = LlavaForConditionalGeneration.from_pretrained(path, dtype=dtype)
        self.model.to(self.device).eval()
        self.context_window = int(self.model.config.text_config.max_position_embeddings)
        eos = self.model.generation_config.eos_token_id
        self.eos_ids = set(eos if isinstance(eos, list) else [eos])
        self._lock = threading.Lock()
        self.load_seconds = time.perf_counter() - started
        log.info(
            "loaded %s in %.2fs (context %d)", model_name, self.load_seconds, self.context_window
        )

    def _inputs(self, job: ChatJob) -> dict:
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
            image_tokens = (
                prompt_tokens - len(self.processor.tokenizer(prompt).input_ids) + len(images)
            )
            raise InvalidRequest(
                f"prompt is {prompt_tokens} tokens (of which about {image_tokens} for "
                f"{len(images)} image(s)); "
                f"the model's context window is {self.context_window} tokens"
            )
        return inputs

    def _sampling(self, job: ChatJob, prompt_tokens: int) -> dict:
        options = job.options
        limit = min(self.max_output_tokens, self.context_window - prompt_tokens)
        max_new = min(options.max_tokens, limit) if options.max_tokens is not None else limit
        kwargs: dict = {"max_new_tokens": max(max_new, 1)}
        if options.temperature <= 0:
            kwargs["do_sample"] = False
        else:
            kwargs.update(
                do_sample=True,
                temperature=options.temperature,
                top_p=options.top_p,
                top_k=options.top_k or None,
            )
        return kwargs

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def generate(self, job: ChatJob, sink: TokenSink) -> Generation:
        inputs = self._inputs(job)  # CPU work: not billed
        prompt_tokens = int(inputs["input_ids"].shape[1])
        kwargs = self._sampling(job, prompt_tokens)
        detok = Detokenizer(
            lambda ids: self.processor.tokenizer.decode(ids, skip_special_tokens=True),
            job.options.stop,
        )
        stream = _Stream(detok, sink, self.eos_ids)
        seed = job.options.seed if job.options.seed is not None else random.getrandbits(63)
        with self._lock, torch.inference_mode():
            torch.manual_seed(seed)
            self._sync()
            started = time.perf_counter()
            self.model.generate(
                **inputs.to(self.device),
                **kwargs,
                streamer=stream,
                stopping_criteria=[stream],
            )
            self._sync()
            finished = time.perf_counter()
        first = stream.first_token_at or finished
        if stream.cancelled:
            reason = "cancelled"
        elif stream.eos_seen or detok.stopped:
            reason = "stop"
        else:
            reason = "length" if stream.count >= kwargs["max_new_tokens"] else "stop"
        return Generation(
            done_reason=reason,
            prompt_tokens=prompt_tokens,
            output_tokens=stream.count,
            prompt_eval_seconds=first - started,
            eval_seconds=finished - first,
            gpu_seconds=finished - started,
        )
