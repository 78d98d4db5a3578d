"""Where an engine runs, in which precision, and which attention kernels it lets PyTorch
choose on a GPU."""

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


def place(name: str, gpu_dtype: torch.dtype) -> tuple[torch.device, torch.dtype]:
    """The device (`auto`: the GPU if there is one) and the weights' dtype (`gpu_dtype` on a
    GPU, float32 on the CPU) of an engine; on a GPU, without cuDNN attention."""
    device = torch.device(
        ("cuda" if torch.cuda.is_available() else "cpu") if name == "auto" else name
    )
    if device.type == "cuda":
        without_cudnn_attention()
        return device, gpu_dtype
    return device, torch.float32
