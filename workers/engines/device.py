"""Where an engine runs, in which precision, which attention kernels it lets PyTorch choose
on a GPU, and how work queued on the device is fed and timed."""

import contextlib
import time
from dataclasses import dataclass
from typing import Any

import torch


def without_cudnn_attention() -> None:
    """Turn off cuDNN's scaled-dot-product attention for this (worker) process.

    cuDNN builds an execution plan for every new shape it sees. A decode step attends over a
    sequence one token longer than the last, and a serving engine sees ever-new batch sizes
    and prompt lengths, so it keeps paying for plans: on an H200 the LLaVA-8B engine decoded
    18 tokens/s over lengths it had not seen and 50 over the same lengths again
    (bench/RESULTS.md). Flash and memory-efficient attention take any shape as it comes.
    """
    torch.backends.cuda.enable_cudnn_sdp(False)


def place(
    name: str, gpu_dtype: torch.dtype, cudnn_attention: bool = False
) -> tuple[torch.device, torch.dtype]:
    """The device (`auto`: the GPU if there is one) and the weights' dtype (`gpu_dtype` on a
    GPU, float32 on the CPU) of an engine; on a GPU, without cuDNN attention unless asked
    (an engine whose shapes repeat, as Stable Diffusion's do, pays for its plans once)."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )
    if device.type == "cuda":
        if not cudnn_attention:
            without_cudnn_attention()
        return device, gpu_dtype
    return device, torch.float32


def to_device(values: list, device: torch.device, dtype: torch.dtype | None = None) -> torch.Tensor:
    """A small host list as a tensor on `device`, without waiting for the work queued there:
    on a GPU through pinned memory, whose copy is truly asynchronous (a copy from pageable
    memory may wait for the stream, and a decode step's inputs are made while the step
    before it still runs)."""
    tensor = torch.tensor(values, dtype=dtype)
    if device.type != "cuda":
        return tensor
    return tensor.pin_memory().to(device, non_blocking=True)


def clock(device: torch.device) -> torch.cuda.Event | float:
    """Now, on the device's timeline (an event recorded on its stream) or the CPU's."""
    if device.type != "cuda":
        return time.perf_counter()
    event = torch.cuda.Event(enable_timing=True)
    event.record()
    return event


@dataclass(eq=False)
class Step:
    """A launched decode step: its rows (the batch's order at launch) and sampled tokens,
    timed by two `clock` readings around it."""

    rows: list
    tokens: torch.Tensor  # on the device: the next step's input
    host: torch.Tensor  # the same, copied to the CPU once `ended` is reached
    started: torch.cuda.Event | float
    ended: torch.cuda.Event | float
    scores: Any = None  # the rows' log probabilities (workers.engines.logprobs), on the CPU

    def wait(self) -> None:
        if isinstance(self.ended, torch.cuda.Event):
            self.ended.synchronize()

    def seconds(self) -> float:
        """How long the step kept the device busy (call after `wait`)."""
        if isinstance(self.started, float):
            return self.ended - self.started
        return self.started.elapsed_time(self.ended) / 1000


def serving(compiled: bool) -> contextlib.AbstractContextManager:
    """Where a request's work runs on an engine that compiled at load (the SD UNet, the LLaVA
    decode step): compiled code where its guards hold, eager elsewhere, never a compilation."""
    if not compiled:
        return contextlib.nullcontext()
    return torch.compiler.set_stance("eager_on_recompile")
