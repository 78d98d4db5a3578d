"""Which attention kernels the engines let PyTorch choose on a GPU."""

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
