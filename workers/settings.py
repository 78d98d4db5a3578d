"""Settings of a worker process (`gpuhost worker`)."""

import re
from typing import Literal

from pydantic import AliasChoices, Field, field_validator, model_validator

from config import Listed, ModelSettings

SIZE = re.compile(r"^(\d+)x(\d+)$")


class WorkerSettings(ModelSettings):
    queue: Literal["llava", "sd", "train"] = "llava"
    # Requests a worker process takes from the queue at once (Celery threads).
    concurrency: int = 4
    device: str = "auto"  # auto | cpu | cuda | cuda:N
    # transformers: continuous batching in-process (CPU, GPU fallback); vllm: vLLM on GPUs;
    # echo: no model at all, for measuring the rest of the service (bench/gateway.py).
    engine: Literal["transformers", "vllm", "echo"] = "transformers"
    vllm_gpu_memory_utilization: float = 0.9
    vllm_max_model_len: int | None = None
    vllm_enforce_eager: bool = False
    max_output_tokens: int = 2048
    # The transformers engine's decode steps. fixed: a KV cache allocated at load (max batch x
    # context window), each step's shape replayed as a CUDA graph on a GPU; dynamic: a cache
    # that grows with the sequences, one eager step after another; auto: fixed on a GPU.
    # ("slots", this setting's former name for fixed, is read as fixed.)
    llava_decode: Literal["auto", "fixed", "dynamic"] = "auto"
    # Requests that arrive together are prefilled in one forward pass of at most this many
    # padded prompt tokens (rows x the longest prompt; one image is 576 of them). Smaller:
    # running streams stall less per pass; larger: a burst's first tokens come in fewer passes.
    llava_prefill_tokens: int = Field(8192, ge=1)
    # The fixed cache's decode step compiled (torch.compile, Inductor) at load, for every
    # bucket, then captured as CUDA graphs (auto: on a GPU). Loading takes minutes longer.
    llava_compile: Literal["auto", "on", "off"] = "auto"
    # The language model's linear layers: bf16 (float32 on the CPU), or fp8 (float8 weights
    # with a scale per channel, inputs scaled per token; GPUs of compute capability 8.9 and
    # newer; half the layers' bytes, so decode reads half as much). GPUHOST_LLAVA_WEIGHTS.
    llava_weight_format: Literal["bf16", "fp8"] = Field(
        "bf16", validation_alias=AliasChoices("GPUHOST_LLAVA_WEIGHTS", "llava_weight_format")
    )
    # Stable Diffusion: most images run as one batch.
    sd_max_batch_images: int = 8
    # An idle Stable Diffusion engine given a request waits this long for others of its shape,
    # so that a burst runs as one batch (its first request would otherwise run alone).
    sd_batch_window_seconds: float = 0.02
    # On a GPU: let attention use cuDNN (fastest on Stable Diffusion's fixed shapes, but each
    # new shape first builds a plan), and build the plans of these sizes (WxH) at load.
    sd_cudnn_attention: bool = True
    sd_warm_sizes: Listed = ["512x512"]
    # Denoising steps of each warm-up batch at load (every batch size, each warm size).
    sd_warm_steps: int = Field(2, ge=1)
    # Compile the UNet (torch.compile) at load for the warm sizes (auto: on a GPU). Loading
    # takes a minute or more longer; batches of other sizes run uncompiled.
    sd_compile: Literal["auto", "on", "off"] = "auto"
    # Seconds an idle model stays loaded; negative: for as long as the worker runs. The model is
    # every tenant's: a request's keep_alive (Ollama's) may keep it loaded longer than this,
    # never unload it sooner nor pin it for good (ignored if honour_keep_alive is false).
    keep_alive_seconds: float = -1.0
    honour_keep_alive: bool = True
    # Prometheus metrics on this port (0: off).
    metrics_port: int = 0
    # A running job's claim expires this long after its worker stops renewing it.
    claim_ttl_seconds: float = 15.0
    # Fine-tuning: a running job whose worker has not reported for this long is presumed
    # lost and queued again (it resumes from its last checkpoint).
    train_stale_seconds: float = 120.0

    @field_validator("llava_decode", mode="before")
    @classmethod
    def _former_name(cls, value: object) -> object:
        return "fixed" if value == "slots" else value

    @field_validator("sd_warm_sizes")
    @classmethod
    def _sizes(cls, sizes: list[str]) -> list[str]:
        for size in sizes:
            match = SIZE.match(size)
            if not match or any(int(side) % 8 or not int(side) for side in match.groups()):
                raise ValueError(
                    f"sd_warm_sizes: {size!r} is not WIDTHxHEIGHT in multiples of 8 (512x512)"
                )
        return sizes

    @model_validator(mode="after")
    def _fp8_needs_transformers(self) -> "WorkerSettings":
        if self.llava_weight_format == "fp8" and self.engine != "transformers":
            raise ValueError(
                f"GPUHOST_LLAVA_WEIGHTS=fp8 is a transformers engine setting; the {self.engine} "
                "engine loads the weights as they are (unset it, or set "
                "GPUHOST_ENGINE=transformers)"
            )
        return self

    def sd_compile_wanted(self) -> bool | None:
        return {"auto": None, "on": True, "off": False}[self.sd_compile]

    def sd_warm_sizes_parsed(self) -> tuple[tuple[int, int], ...]:
        return tuple(tuple(map(int, SIZE.match(size).groups())) for size in self.sd_warm_sizes)
