"""Choosing the next token of each sequence: greedy, or temperature / top-k / top-p sampling,
each sequence with its own options and its own random generator (so a seed gives the same
answer in any batch).

The rows of a decode step are picked together, one set of kernels for the whole batch rather
than one per row: on a GPU a row's own sort, softmaxes and draw cost more to launch than to
run (bench/RESULTS.md). Only the random numbers are drawn per row, from the row's generator;
the draw is an exponential race (the token with the largest probability / Exp(1) noise wins,
which picks each token with its probability).
"""

import torch

from workers.contract import SamplingOptions
from workers.engines.device import to_device

# Below this temperature, sampling is greedy: dividing logits by a tinier one overflows
# (a temperature of 1e-300 made every probability NaN).
GREEDY_BELOW = 1e-3
# Noise is at least this, so a zero draw cannot turn probability 0 into 0 / 0 = NaN.
SMALLEST_NOISE = 1e-20


class Sampler:
    def __init__(self, options: SamplingOptions, seed: int, device: torch.device):
        self.greedy = options.temperature < GREEDY_BELOW
        self.temperature = 1.0 if self.greedy else options.temperature
        self.top_k = options.top_k
        # top_p outside (0, 1) keeps every token: 2 is above any cumulative probability.
        self.top_p = options.top_p if 0 < options.top_p < 1 else 2.0
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """`logits`: one row, float, over the vocabulary (suppressed tokens already -inf)."""
        return int(pick([self], logits.unsqueeze(0))[0])


def pick(samplers: list[Sampler], logits: torch.Tensor) -> torch.Tensor:
    """The next token of each row of `logits` ([rows, vocabulary]), row i with samplers[i]:
    a tensor of token ids on the logits' device, computed without waiting for the device."""
    rows, vocabulary = logits.shape
    device = logits.device
    if all(sampler.greedy for sampler in samplers):
        return torch.argmax(logits, dim=-1)

    def column(values: list, dtype: torch.dtype) -> torch.Tensor:
        return to_device(values, device, dtype).unsqueeze(1)

    temperature = column([s.temperature for s in samplers], torch.float32)
    top_k = column(
        [s.top_k if 0 < s.top_k < vocabulary else vocabulary for s in samplers], torch.long
    )
    top_p = column([s.top_p for s in samplers], torch.float32)
    ordered, order = torch.sort(logits.float() / temperature, dim=-1, descending=True)
    rank = torch.arange(vocabulary, device=device)
    ordered = ordered.masked_fill(rank >= top_k, float("-inf"))
    probabilities = torch.softmax(ordered, dim=-1)
    # Drop tokens once the ones before them already cover top_p (always keep the first, even
    # when top_p is below float32's range: 1e-261 compares as 0).
    drop = probabilities.cumsum(dim=-1) - probabilities >= top_p
    drop[:, 0] = False
    probabilities = torch.softmax(ordered.masked_fill(drop, float("-inf")), dim=-1)
    noise = torch.stack(
        [
            torch.ones(vocabulary, device=device)
            if s.greedy
            else torch.empty(vocabulary, device=device).exponential_(generator=s.generator)
            for s in samplers
        ]
    ).clamp_min_(SMALLEST_NOISE)
    chosen = torch.argmax(probabilities / noise, dim=-1, keepdim=True)
    greedy = column([s.greedy for s in samplers], torch.bool)
    chosen = chosen.masked_fill(greedy, 0)  # a greedy row's likeliest token: first in order
    return order.gather(1, chosen).squeeze(1)
