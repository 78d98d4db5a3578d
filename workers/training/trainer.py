"""LoRA training of the Stable Diffusion UNet with peft, resumable from its checkpoints.

The base weights stay frozen and resident (one pipeline per train worker); a job adds a
low-rank adapter to the UNet's attention projections, trains it on the standard denoising
objective (predict the noise, or the velocity for v-prediction models, at a random timestep)
and takes it out again at the end. A checkpoint holds everything a run needs to go on exactly
where it stopped: adapter weights, optimizer state, the random generator and the step. The
time of each step is measured on the device (synchronised), so what is billed is the steps'
work, never the load or the checkpoint writes.
"""

import io
import logging
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from diffusers import DDPMScheduler, StableDiffusionPipeline
from diffusers.utils import convert_state_dict_to_diffusers
from diffusers.utils.torch_utils import randn_tensor
from peft import LoraConfig
from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict
from PIL import Image

from tuning.params import TrainParams
from workers.engines.device import place

log = logging.getLogger(__name__)

ADAPTER = "gpuhost-train"  # not "training": nn.Module has that attribute
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]


@dataclass(frozen=True)
class Checkpoint:
    step: int
    state: bytes  # torch.save of adapter, optimizer and generator state


class Hooks:
    """What a run reports as it goes (the task writes it to PostgreSQL and storage)."""

    def step(self, step: int, loss: float) -> bool:
        """After each step; True: stop (cancelled)."""
        raise NotImplementedError

    def checkpoint(
        self, checkpoint: Checkpoint, from_step: int, gpu_seconds: float, loss: float
    ) -> None:
        """Steps [from_step, checkpoint.step) are kept; they took `gpu_seconds`, and their
        mean loss was `loss`."""
        raise NotImplementedError


@dataclass(frozen=True)
class TrainResult:
    adapter: bytes | None  # safetensors in diffusers' LoRA format; None when cancelled
    steps: int
    losses: list[float]


class Trainer:
    def __init__(self, model_name: str, path: Path, device: str = "auto"):
        self.model_name = model_name
        self.device, self.dtype = place(device, torch.float16)
        started = time.perf_counter()
        self.pipe = StableDiffusionPipeline.from_pretrained(path, dtype=self.dtype).to(self.device)
        for module in (self.pipe.unet, self.pipe.vae, self.pipe.text_encoder):
            module.requires_grad_(False)
        self.noise_scheduler = DDPMScheduler.from_config(self.pipe.scheduler.config)
        self.native_resolution = self.pipe.unet.config.sample_size * self.pipe.vae_scale_factor
        self.load_seconds = time.perf_counter() - started
        # For metrics: device time of steps run, of steps kept at checkpoints (what is billed),
        # and whether a job is training now.
        self.counters = {"busy_seconds": 0.0, "billed_seconds": 0.0, "active": 0, "loaded": 1}
        log.info("trainer loaded %s in %.2fs", model_name, self.load_seconds)

    def status(self) -> dict:
        """For the worker's metrics."""
        return {"model": self.model_name, "load_seconds": self.load_seconds, **self.counters}

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _batches(self, examples: list[tuple[Image.Image, str]]):
        pixels = torch.stack(
            [
                torch.from_numpy(np.asarray(image, dtype=np.float32) / 127.5 - 1.0).permute(2, 0, 1)
                for image, _ in examples
            ]
        )
        tokenizer = self.pipe.tokenizer
        ids = tokenizer(
            [caption for _, caption in examples],
            padding="max_length",
            truncation=True,
            max_length=tokenizer.model_max_length,
            return_tensors="pt",
        ).input_ids
        return pixels.to(self.device, self.dtype), ids.to(self.device)

    def train(
        self,
        params: TrainParams,
        examples: list[tuple[Image.Image, str]],
        resume: Checkpoint | None,
        hooks: Hooks,
        clock: Callable[[], float] = time.perf_counter,
    ) -> TrainResult:
        unet = self.pipe.unet
        config = LoraConfig(
            r=params.rank,
            lora_alpha=params.rank,
            init_lora_weights="gaussian",
            target_modules=TARGETS,
        )
        unet.add_adapter(config, adapter_name=ADAPTER)
        unet.enable_adapters()
        unet.set_adapter(ADAPTER)
        self.counters["active"] = 1
        try:
            return self._train(params, config, examples, resume, hooks, clock)
        finally:
            self.counters["active"] = 0
            unet.delete_adapters(ADAPTER)

    def _train(self, params, config, examples, resume, hooks, clock) -> TrainResult:
        unet, vae, text_encoder = self.pipe.unet, self.pipe.vae, self.pipe.text_encoder
        trainable = [p for p in unet.parameters() if p.requires_grad]
        for p in trainable:  # the adapter trains in full precision over fp16 base weights
            p.data = p.data.float()
        optimizer = torch.optim.AdamW(trainable, lr=params.learning_rate)
        generator = torch.Generator("cpu").manual_seed(params.seed)
        start = 0
        if resume is not None:
            state = torch.load(io.BytesIO(resume.state), weights_only=True)
            set_peft_model_state_dict(unet, state["adapter"], adapter_name=ADAPTER)
            optimizer.load_state_dict(state["optimizer"])
            generator.set_state(state["generator"])
            start = state["step"]
            log.info("resuming at step %d of %d", start, params.steps)
        pixels, ids = self._batches(examples)
        scheduler = self.noise_scheduler
        prediction = scheduler.config.prediction_type
        autocast = torch.autocast(
            self.device.type, dtype=torch.float16, enabled=self.dtype != torch.float32
        )
        losses, seconds, segment_start = [], 0.0, start
        unet.train()
        try:
            for step in range(start, params.steps):
                began = clock()
                pick = torch.randint(0, len(examples), (params.batch_size,), generator=generator)
                with torch.no_grad():
                    latents = vae.encode(pixels[pick.to(self.device)]).latent_dist.sample(generator)
                    latents = latents * vae.config.scaling_factor
                    hidden = text_encoder(ids[pick.to(self.device)])[0]
                noise = randn_tensor(latents.shape, generator, self.device, latents.dtype)
                timesteps = torch.randint(
                    0,
                    scheduler.config.num_train_timesteps,
                    (params.batch_size,),
                    generator=generator,
                ).to(self.device)
                noisy = scheduler.add_noise(latents, noise, timesteps)
                target = (
                    scheduler.get_velocity(latents, noise, timesteps)
                    if prediction == "v_prediction"
                    else noise
                )
                with autocast:
                    predicted = unet(noisy, timesteps, hidden).sample
                loss = F.mse_loss(predicted.float(), target.float())
                loss.backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                value = loss.item()  # waits for the device
                self._sync()
                took = clock() - began
                seconds += took
                self.counters["busy_seconds"] += took
                losses.append(value)
                done = step + 1
                stop = hooks.step(done, value)
                if stop or done == params.steps or done % params.checkpoint_every == 0:
                    state = {
                        "adapter": get_peft_model_state_dict(unet, adapter_name=ADAPTER),
                        "optimizer": optimizer.state_dict(),
                        "generator": generator.get_state(),
                        "step": done,
                    }
                    buffer = io.BytesIO()
                    torch.save(state, buffer)
                    segment = losses[segment_start - start :]
                    hooks.checkpoint(
                        Checkpoint(done, buffer.getvalue()),
                        segment_start,
                        seconds,
                        sum(segment) / len(segment),
                    )
                    self.counters["billed_seconds"] += seconds
                    seconds, segment_start = 0.0, done
                if stop:
                    return TrainResult(None, done, losses)
        finally:
            unet.eval()
        return TrainResult(adapter_file(self.pipe.unet, config, ADAPTER), params.steps, losses)


def adapter_file(unet: torch.nn.Module, config: LoraConfig, name: str) -> bytes:
    """The UNet's adapter `name` in diffusers' LoRA format (what `load_lora_weights` reads)."""
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(unet, adapter_name=name))
    with tempfile.TemporaryDirectory() as directory:
        StableDiffusionPipeline.save_lora_weights(
            directory,
            unet_lora_layers=layers,
            unet_lora_adapter_metadata=config.to_dict(),
        )
        return (Path(directory) / "pytorch_lora_weights.safetensors").read_bytes()
