"""Stable Diffusion on diffusers: text-to-image, image-to-image and inpainting, micro-batched.

One pipeline set per process: the image-to-image and inpainting pipelines are built from the
text-to-image pipeline's components, so the weights are loaded once. An engine thread takes
waiting requests and runs those with compatible shapes (mode, size, steps, scheduler, guidance,
strength, adapter) as one batch: every image gets its own generator (seed + index), so a seed
gives the same image alone or in a batch. The batch's device time is split among its requests
by their share of the work, steps x pixels per image (`workers.metering`).
"""

import base64
import io
import logging
import queue
import threading
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
)
from PIL import Image
from safetensors import SafetensorError
from safetensors.torch import load as load_safetensors

from storage import Storage
from workers.contract import ImageJob
from workers.engines.base import InvalidRequest
from workers.engines.device import place
from workers.metering import Meter

log = logging.getLogger(__name__)

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
}
IDLE_WAIT_SECONDS = 0.5


class ProgressSink:
    """Where the engine reports a request's progress; also says when its client has gone."""

    def progress(self, step: int, steps: int) -> None: ...

    def should_stop(self) -> bool: ...


@dataclass(frozen=True)
class Rendering:
    images: list[str]  # base64 PNGs
    gpu_seconds: float
    run_seconds: float
    batch_images: int
    cancelled: bool


@dataclass(eq=False)
class _Request:
    job: ImageJob
    sink: ProgressSink
    image: Image.Image | None
    mask: Image.Image | None
    done: threading.Event = field(default_factory=threading.Event)
    result: Rendering | None = None
    error: BaseException | None = None

    def shape(self) -> tuple:
        j = self.job
        return (
            j.kind,
            j.width,
            j.height,
            j.steps,
            j.scheduler,
            j.guidance_scale,
            j.strength,
            j.lora,
            j.lora_weight,
        )


def _decode(data: str, mode: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(data))).convert(mode)


def _png(image: Image.Image) -> str:
    buffer = io.BytesIO()
    image.save(buffer, "PNG")
    return base64.b64encode(buffer.getvalue()).decode()


class DiffusionEngine:
    def __init__(
        self,
        model_name: str,
        path: Path,
        device: str = "auto",
        max_batch_images: int = 8,
        batch_window_seconds: float = 0.0,
        storage: Storage | None = None,
        max_adapters: int = 8,
        cudnn_attention: bool = False,
        cudnn_benchmark: bool = False,
        warm_sizes: tuple[tuple[int, int], ...] = (),
    ):
        self.model_name = model_name
        self.device, self.dtype = place(device, torch.float16, cudnn_attention)
        if cudnn_benchmark and self.device.type == "cuda":
            # cuDNN times its convolution algorithms on each new shape and keeps the fastest.
            torch.backends.cudnn.benchmark = True
        self.max_batch_images = max_batch_images
        # An idle engine given a request waits this long for others of its shape to join it.
        self.batch_window_seconds = batch_window_seconds
        # LoRA adapters (from fine-tuning) are read from storage on first use and kept
        # loaded, the least recently used one unloaded beyond `max_adapters`.
        self.storage = storage
        self.max_adapters = max_adapters
        self._adapters: OrderedDict[str, None] = OrderedDict()
        started = time.perf_counter()
        log.info("loading %s from %s on %s", model_name, path, self.device)
        text = StableDiffusionPipeline.from_pretrained(path, dtype=self.dtype)
        text = text.to(self.device)
        text.set_progress_bar_config(disable=True)
        parts = text.components
        self.pipelines = {
            "txt2img": text,
            "img2img": StableDiffusionImg2ImgPipeline(**parts),
            "inpaint": StableDiffusionInpaintPipeline(**parts),
        }
        for pipe in self.pipelines.values():
            pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = text.scheduler.config
        if self.device.type == "cuda":
            self._warm(warm_sizes)
        self.load_seconds = time.perf_counter() - started
        self.meter = Meter()
        self.batches = 0
        self.batch_requests = 0
        self._waiting: queue.Queue[_Request] = queue.Queue()
        self._held: list[_Request] = []  # taken from the queue, incompatible with the last batch
        self._running = 0  # requests in the batch on the device now
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-engine", daemon=True)
        self._thread.start()
        log.info("loaded %s in %.2fs", model_name, self.load_seconds)

    @torch.inference_mode()
    def _warm(self, sizes: tuple[tuple[int, int], ...]) -> None:
        """Run every batch size at each of `sizes` once, two steps, at load: the first batch
        of a shape pays for the GPU libraries' plans and kernel loading (cuDNN's attention
        most of all), and load time is never billed; without this, the tenant whose request
        first made a shape would pay for it."""
        pipe = self.pipelines["txt2img"]
        for width, height in sizes:
            for n in range(1, self.max_batch_images + 1):
                pipe(
                    prompt=["warm-up"] * n,
                    negative_prompt=[""] * n,
                    num_inference_steps=2,
                    width=width,
                    height=height,
                    output_type="pil",
                )
        if sizes:
            log.info("warmed %s for batches of 1..%d", sizes, self.max_batch_images)

    # -- the calling (Celery task) thread ------------------------------------------------------

    def render(self, job: ImageJob, sink: ProgressSink) -> Rendering:
        if job.lora is not None and (self.storage is None or job.lora_key is None):
            raise InvalidRequest(f"LoRA adapter '{job.lora}' not found")
        image = _decode(job.image, "RGB") if job.image else None
        mask = _decode(job.mask, "L") if job.mask else None
        if image is not None:
            image = image.resize((job.width, job.height))
        if mask is not None:
            mask = mask.resize((job.width, job.height))
        request = _Request(job, sink, image, mask)
        self._waiting.put(request)
        request.done.wait()
        if request.error is not None:
            raise request.error
        return request.result

    def status(self) -> dict:
        weights = [
            p
            for module in (
                self.pipelines["txt2img"].unet,
                self.pipelines["txt2img"].vae,
                self.pipelines["txt2img"].text_encoder,
            )
            for p in module.parameters()
        ]
        return {
            "model": self.model_name,
            "loaded": True,
            "expires_at": None,
            "parameters": sum(p.numel() for p in weights),
            "size_bytes": sum(p.numel() * p.element_size() for p in weights),
            "device": str(self.device),
            "dtype": str(self.dtype).removeprefix("torch."),
            "context_length": 77,
            "load_seconds": self.load_seconds,
            "busy_seconds": self.meter.busy_seconds,
            "billed_seconds": self.meter.billed_seconds,
            "active": self._waiting.qsize() + len(self._held) + self._running,
            "batches": self.batches,
            "batch_requests": self.batch_requests,
        }

    def close(self) -> None:
        self._stopping.set()
        self._thread.join()

    # -- the engine thread ---------------------------------------------------------------------

    def _run(self) -> None:
        while not self._stopping.is_set():
            batch = self._collect()
            if not batch:
                continue
            self._running = len(batch)
            try:
                self._render(batch)
            except Exception as exc:  # the batch fails, the engine goes on
                log.exception("a batch of %d request(s) failed", len(batch))
                for request in batch:
                    request.error = exc
                    request.done.set()
            finally:
                self._running = 0

    def _collect(self) -> list[_Request]:
        """The next batch: the oldest request and the waiting ones of its shape."""
        if not self._held:
            try:
                self._held.append(self._waiting.get(timeout=IDLE_WAIT_SECONDS))
            except queue.Empty:
                return []
            self._gather_for(self.batch_window_seconds)
        self._gather_for(0.0)
        first = self._held[0]
        batch, images = [], 0
        for request in list(self._held):
            if request.shape() == first.shape() and images + request.job.n <= max(
                self.max_batch_images, first.job.n
            ):
                batch.append(request)
                images += request.job.n
                self._held.remove(request)
        return batch

    def _gather_for(self, seconds: float) -> None:
        """Take what is waiting; for up to `seconds` more, what arrives, until the first
        request's batch is full."""
        deadline = time.monotonic() + seconds
        while True:
            first = self._held[0]
            room = max(self.max_batch_images, first.job.n) - sum(
                r.job.n for r in self._held if r.shape() == first.shape()
            )
            left = deadline - time.monotonic()
            try:
                if left > 0 and room > 0:
                    self._held.append(self._waiting.get(timeout=left))
                else:
                    self._held.append(self._waiting.get_nowait())
            except queue.Empty:
                return

    @torch.inference_mode()
    def _render(self, batch: list[_Request]) -> None:
        first = batch[0].job
        pipe = self.pipelines[first.kind]
        self._use_adapter(first)
        pipe.scheduler = SCHEDULERS[first.scheduler].from_config(self.scheduler_config)
        prompts, negatives, generators, owners = [], [], [], []
        images, masks = [], []
        for request in batch:
            job = request.job
            for i in range(job.n):
                prompts.append(job.prompt)
                negatives.append(job.negative_prompt)
                generators.append(torch.Generator(self.device).manual_seed(job.seed + i))
                owners.append(request)
                if request.image is not None:
                    images.append(request.image)
                if request.mask is not None:
                    masks.append(request.mask)
        kwargs: dict = {
            "prompt": prompts,
            "negative_prompt": negatives,
            "num_inference_steps": first.steps,
            "guidance_scale": first.guidance_scale,
            "generator": generators,
            "output_type": "pil",
        }
        if first.kind == "txt2img":
            kwargs |= {"width": first.width, "height": first.height}
        else:
            kwargs |= {"image": images, "strength": first.strength}
        if first.kind == "inpaint":
            kwargs |= {"mask_image": masks, "width": first.width, "height": first.height}

        def on_step(pipeline, step: int, timestep, callback_kwargs: dict) -> dict:
            total = pipeline._num_timesteps if hasattr(pipeline, "_num_timesteps") else first.steps
            for request in batch:
                request.sink.progress(step + 1, total)
            if all(request.sink.should_stop() for request in batch):
                pipeline._interrupt = True
            return callback_kwargs

        kwargs["callback_on_step_end"] = on_step
        for request in batch:
            self.meter.open(request)
        self._sync()
        started = time.perf_counter()
        out = pipe(**kwargs)
        self._sync()
        seconds = time.perf_counter() - started
        work = {r: float(r.job.n * first.steps * first.width * first.height) for r in batch}
        self.meter.charge(seconds, work)
        self.batches += 1
        self.batch_requests += len(batch)
        cancelled = bool(getattr(pipe, "_interrupt", False))
        pngs: dict[_Request, list[str]] = {r: [] for r in batch}
        for owner, image in zip(owners, out.images, strict=True):
            pngs[owner].append(_png(image))
        for request in batch:
            request.result = Rendering(
                images=pngs[request],
                gpu_seconds=self.meter.close(request),
                run_seconds=seconds,
                batch_images=len(owners),
                cancelled=cancelled,
            )
            request.done.set()

    def _use_adapter(self, job: ImageJob) -> None:
        """Put the batch's adapter (or none) on the UNet the three pipelines share."""
        text = self.pipelines["txt2img"]
        if job.lora is None:
            if self._adapters:
                text.disable_lora()
            return
        if job.lora not in self._adapters:
            try:
                state = load_safetensors(self.storage.get(job.lora_key))
            except (FileNotFoundError, SafetensorError) as exc:
                raise InvalidRequest(f"LoRA adapter '{job.lora}' not found") from exc
            text.load_lora_weights(state, adapter_name=job.lora)
            self._adapters[job.lora] = None
            while len(self._adapters) > self.max_adapters:
                old, _ = self._adapters.popitem(last=False)
                text.delete_adapters(old)
        self._adapters.move_to_end(job.lora)
        text.enable_lora()
        text.set_adapters([job.lora], adapter_weights=[job.lora_weight])

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
