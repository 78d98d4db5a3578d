"""Choosing the next token of one sequence: greedy, or temperature / top-k / top-p sampling
with the sequence's own random generator (so a seed gives the same answer in any batch)."""

import torch

from workers.contract import SamplingOptions

# Below this temperature, sampling is greedy: dividing logits by a tinier one overflows
# (a temperature of 1e-300 made every probability NaN).
GREEDY_BELOW = 1e-3


class Sampler:
    def __init__(self, options: SamplingOptions, seed: int, device: torch.device):
        self.temperature = options.temperature
        self.top_k = options.top_k
        self.top_p = options.top_p
        self.generator = torch.Generator(device=device)
        self.generator.manual_seed(seed)

    def __call__(self, logits: torch.Tensor) -> int:
        """`logits`: one row, float, over the vocabulary (suppressed tokens already -inf)."""
        if self.temperature < GREEDY_BELOW:
            return int(torch.argmax(logits))
        scores = logits.float() / self.temperature
        if 0 < self.top_k < scores.shape[-1]:
            kth = torch.topk(scores, self.top_k).values[-1]
            scores = scores.masked_fill(scores < kth, float("-inf"))
        if 0 < self.top_p < 1:
            ordered, order = torch.sort(scores, descending=True)
            cumulative = torch.softmax(ordered, dim=-1).cumsum(dim=-1)
            # Drop tokens once the ones before them already cover top_p (always keep the first).
            drop = cumulative - torch.softmax(ordered, dim=-1) >= self.top_p
            drop[0] = False  # even when top_p is below float32's range (1e-261 compares as 0)
            scores = scores.index_fill(0, order[drop], float("-inf"))
        probabilities = torch.softmax(scores, dim=-1)
        return int(torch.multinomial(probabilities, 1, generator=self.generator))
