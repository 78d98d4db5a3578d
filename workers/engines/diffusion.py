"""Stable Diffusion on diffusers: text-to-image, image-to-image and inpainting, micro-batched.

One pipeline set per process: the image-to-image and inpainting pipelines are built from the
text-to-image pipeline's components, so the weights are loaded once. An engine thread takes
waiting requests and runs those with compatible shapes (mode, size, steps, scheduler, guidance,
strength, adapter, style) as one batch: every image gets its own generator (seed + index), so a seed
gives the same image alone or in a batch. The batch's device time is split among its requests
by their share of the work, steps x pixels per image (`workers.metering`).

On a GPU the UNet is compiled at load for the sizes the worker warms (`unet_compile`): a batch
of such a size runs the compiled graph (an adapter fused into the weights, `sd_adapters`), any
other batch the eager UNet.

A batch with a style (a reference image per request) runs with the model's IP-Adapter on,
at the batch's strength (`sd_style`), and eagerly.
"""

import contextlib
import logging
import queue
import threading
import time
from collections.abc import Iterator
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

from storage import Storage
from workers.contract import ImageJob
from workers.engines.base import InvalidRequest
from workers.engines.device import place, serving
from workers.engines.sd_adapters import Adapters
from workers.engines.sd_requests import ImageRequest, ProgressSink, Rendering, decode_image, png
from workers.engines.sd_style import RowStyles, Style
from workers.engines.unet_compile import compile_unet, uncompile_unet
from workers.metering import Meter

log = logging.getLogger(__name__)

SCHEDULERS = {
    "euler": EulerDiscreteScheduler,
    "euler_a": EulerAncestralDiscreteScheduler,
    "dpmpp_2m": DPMSolverMultistepScheduler,
    "ddim": DDIMScheduler,
}
IDLE_WAIT_SECONDS = 0.5


class TextToImage(RowStyles, StableDiffusionPipeline):
    pass


class ImageToImage(RowStyles, StableDiffusionImg2ImgPipeline):
    pass


class Inpainting(RowStyles, StableDiffusionInpaintPipeline):
    pass


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
        compiled: bool | None = None,
        channels_last: bool | None = None,
        warm_steps: int = 2,
    ):
        self.model_name = model_name
        self.device, self.dtype = place(device, torch.float16, cudnn_attention)
        if cudnn_benchmark and self.device.type == "cuda":
            # cuDNN times its convolution algorithms on each new shape and keeps the fastest.
            torch.backends.cudnn.benchmark = True
        self.max_batch_images = max_batch_images
        if warm_steps < 1:
            raise ValueError(f"warm_steps must be at least 1, not {warm_steps}")
        self.warm_steps = warm_steps  # denoising steps of each warm-up batch
        # An idle engine given a request waits this long for others of its shape to join it.
        self.batch_window_seconds = batch_window_seconds
        started = time.perf_counter()
        log.info("loading %s from %s on %s", model_name, path, self.device)
        text = TextToImage.from_pretrained(path, dtype=self.dtype)
        text = text.to(self.device)
        text.set_progress_bar_config(disable=True)
        parts = text.components
        self.pipelines = {
            "txt2img": text,
            "img2img": ImageToImage(**parts),
            "inpaint": Inpainting(**parts),
        }
        for pipe in self.pipelines.values():
            pipe.set_progress_bar_config(disable=True)
        self.scheduler_config = text.scheduler.config
        self._prepare(warm_sizes, compiled, channels_last)
        self.adapters = Adapters(text, storage, max_adapters, self.compiled)
        self.style = Style.of_model(Path(path), self.device, self.dtype)
        self.load_seconds = time.perf_counter() - started
        self.meter = Meter()
        self.batches = 0
        self.batch_requests = 0
        self._waiting: queue.Queue[ImageRequest] = queue.Queue()
        # taken from the queue, incompatible with the last batch
        self._held: list[ImageRequest] = []
        self._running = 0  # requests in the batch on the device now
        self._stopping = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sd-engine", daemon=True)
        self._thread.start()
        log.info("loaded %s in %.2fs", model_name, self.load_seconds)

    def _prepare(
        self,
        warm_sizes: tuple[tuple[int, int], ...],
        compiled: bool | None,
        channels_last: bool | None,
    ) -> None:
        """Compile the UNet (`compiled` None: on a GPU) for the warm sizes, when there are
        some, and run them (on a GPU, or to compile): compiling happens at load, never for a
        request. Where compiling fails (Triton finds no C compiler, say), the worker says so
        and runs uncompiled."""
        unet = self.pipelines["txt2img"].unet
        wanted = self.device.type == "cuda" if compiled is None else compiled
        if wanted and not warm_sizes:
            log.warning("not compiling the UNet: no warm sizes to compile it for at load")
        self.compiled = bool(wanted and warm_sizes)
        # The UNet's weights as NHWC (None: when compiled). Compiled, its convolutions run
        # best so: on an H200, 0.128-0.133 s per image at 8 concurrent, 0.149 as NCHW.
        self.channels_last = self.compiled if channels_last is None else channels_last
        if self.channels_last:
            unet.to(memory_format=torch.channels_last)
        if self.compiled:
            compile_unet(unet)
        elif self.device.type != "cuda":
            return
        try:
            self._warm(warm_sizes)
        except Exception:
            if not self.compiled:
                raise
            log.exception("compiling the UNet failed: it runs uncompiled")
            uncompile_unet(unet)
            self.compiled = False
            if channels_last is None:
                self.channels_last = False
                unet.to(memory_format=torch.contiguous_format)
            if self.device.type == "cuda":
                self._warm(warm_sizes)

    @torch.inference_mode()
    def _warm(self, sizes: tuple[tuple[int, int], ...]) -> None:
        """Run every batch size at each of `sizes` once, `warm_steps` steps, at load: the
        first batch of a shape pays for the GPU libraries' plans and kernel loading (cuDNN's
        attention most of all) and, with a compiled UNet, for compiling it; load time is never
        billed, and without this the tenant whose request first made a shape would pay for
        it. (On an H200 the first 25-step batch of 4 and of 8 after a 2-step warm-up still
        cost 1.3-2x the later ones, cause not found: `GPUHOST_SD_WARM_STEPS=25` is how a GPU
        run tells whether a full-length warm-up pays that too, bench/gpu_run.sh.)"""
        started = time.perf_counter()
        pipe = self.pipelines["txt2img"]
        for width, height in sizes:
            for n in range(1, self.max_batch_images + 1):
                pipe(
                    prompt=["warm-up"] * n,
                    negative_prompt=[""] * n,
                    num_inference_steps=self.warm_steps,
                    width=width,
                    height=height,
                    output_type="pil",
                )
        if sizes:
            log.info(
                "warmed %s for batches of 1..%d%s in %.1fs",
                sizes,
                self.max_batch_images,
                " (UNet compiled)" if self.compiled else "",
                time.perf_counter() - started,
            )

    # -- the calling (Celery task) thread ------------------------------------------------------

    def render(self, job: ImageJob, sink: ProgressSink) -> Rendering:
        if job.lora is not None and (self.adapters.storage is None or job.lora_key is None):
            raise InvalidRequest(f"LoRA adapter '{job.lora}' not found")
        if job.style_image is not None and self.style is None:
            raise InvalidRequest(
                f"field 'style_image': model '{self.model_name}' has no IP-Adapter to apply a "
                "style with"
            )
        style = decode_image(job.style_image, "RGB") if job.style_image else None
        image = decode_image(job.image, "RGB") if job.image else None
        mask = decode_image(job.mask, "L") if job.mask else None
        if image is not None:
            image = image.resize((job.width, job.height))
        if mask is not None:
            mask = mask.resize((job.width, job.height))
        request = ImageRequest(job, sink, image, mask, style)
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
            "compiled": self.compiled,
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

    def _collect(self) -> list[ImageRequest]:
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
    def _render(self, batch: list[ImageRequest]) -> None:
        first = batch[0].job
        pipe = self.pipelines[first.kind]
        self.adapters.use(first)
        pipe.scheduler = SCHEDULERS[first.scheduler].from_config(self.scheduler_config)
        prompts, negatives, generators, image_requests = [], [], [], []
        images, masks = [], []
        for request in batch:
            job = request.job
            for i in range(job.n):
                prompts.append(job.prompt)
                negatives.append(job.negative_prompt)
                generators.append(torch.Generator(self.device).manual_seed(job.seed + i))
                image_requests.append(request)
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
        with self._styled(pipe, batch, image_requests, kwargs), serving(self.compiled):
            out = pipe(**kwargs)
        self._sync()
        seconds = time.perf_counter() - started
        work = {r: float(r.job.n * first.steps * first.width * first.height) for r in batch}
        self.meter.charge(seconds, work)
        self.batches += 1
        self.batch_requests += len(batch)
        cancelled = bool(getattr(pipe, "_interrupt", False))
        pngs: dict[ImageRequest, list[str]] = {r: [] for r in batch}
        for asked_by, image in zip(image_requests, out.images, strict=True):
            pngs[asked_by].append(png(image))
        for request in batch:
            request.result = Rendering(
                images=pngs[request],
                gpu_seconds=self.meter.close(request),
                run_seconds=seconds,
                batch_images=len(image_requests),
                cancelled=cancelled,
            )
            request.done.set()

    @contextlib.contextmanager
    def _styled(
        self,
        pipe,
        batch: list[ImageRequest],
        rows: list[ImageRequest],
        kwargs: dict,
    ) -> Iterator[None]:
        """The IP-Adapter on for a batch with a style (each row's reference image into
        `kwargs`); nothing for one without."""
        first = batch[0].job
        if first.style_image is None:
            yield
            return
        with self.style.applied(pipe, first.style_strength):
            guidance = first.guidance_scale > 1 and pipe.unet.config.time_cond_proj_dim is None
            embeds = self.style.embeds(pipe, [row.style for row in rows], guidance)
            kwargs["ip_adapter_image_embeds"] = [embeds]
            yield

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
