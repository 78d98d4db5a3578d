"""Sequences decoding together: one left-padded KV cache, its attention mask and positions.

A sequence joins after its own prefill (its cache, batch of one, is padded on the left to the
batch's length, or the batch to its length) and leaves when it finishes (its row is dropped,
and columns that are padding for every remaining row are trimmed).
"""

import inspect

import torch
from transformers import DynamicCache, LlavaForConditionalGeneration

from workers.engines.device import to_device

# The KV cache argument (and output field) of a model's forward: `cache` in recent
# transformers releases, `past_key_values` before.
CACHE = (
    "cache"
    if "cache" in inspect.signature(LlavaForConditionalGeneration.forward).parameters
    else "past_key_values"
)


def _pad_left(tensor: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dimension -2 (sequence) of a [batch, heads, seq, dim] tensor on the left with zeros."""
    missing = length - tensor.shape[-2]
    if missing == 0:
        return tensor
    shape = list(tensor.shape)
    shape[-2] = missing
    return torch.cat([tensor.new_zeros(shape), tensor], dim=-2)


class GrowingCache:
    def __init__(self, model: LlavaForConditionalGeneration) -> None:
        self.model = model
        self.rows: list = []
        self.cache: DynamicCache | None = None
        self.mask: torch.Tensor | None = None  # [batch, columns], 1 where a real token is
        self.lengths: list[int] = []  # real tokens per row (the next token's position)

    def __len__(self) -> int:
        return len(self.rows)

    def add(self, row, cache: DynamicCache, length: int) -> None:
        """Add a sequence whose prefill produced `cache` (batch of one, `length` tokens)."""
        new_mask = torch.ones((1, length), dtype=torch.long, device=cache.layers[0].keys.device)
        if self.cache is None:
            self.rows, self.cache, self.mask, self.lengths = [row], cache, new_mask, [length]
            return
        columns = max(self.mask.shape[1], length)
        layers = []
        for mine, theirs in zip(self.cache.layers, cache.layers, strict=True):
            keys = torch.cat([_pad_left(mine.keys, columns), _pad_left(theirs.keys, columns)])
            values = torch.cat([_pad_left(mine.values, columns), _pad_left(theirs.values, columns)])
            layers.append((keys, values))
        self.cache = DynamicCache(layers)
        self.mask = torch.cat(
            [
                torch.nn.functional.pad(self.mask, (columns - self.mask.shape[1], 0)),
                torch.nn.functional.pad(new_mask, (columns - length, 0)),
            ]
        )
        self.rows.append(row)
        self.lengths.append(length)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        """One decode step: each row's last token (on the device) at its own position goes in;
        the rows' next-token logits ([rows, vocabulary], float) come out."""
        device = self.mask.device
        self.mask = torch.nn.functional.pad(self.mask, (0, 1), value=1)
        out = self.model(
            input_ids=tokens.unsqueeze(1),
            attention_mask=self.mask,
            position_ids=to_device(self.lengths, device).unsqueeze(1),
            use_cache=True,
            **{CACHE: self.cache},
        )
        self.lengths = [n + 1 for n in self.lengths]
        return out.logits[:, -1].float()

    def keep(self, keep: list[int]) -> None:
        """Keep only the rows at these indices."""
        if not keep:
            self.rows, self.cache, self.mask, self.lengths = [], None, None, []
            return
        if len(keep) == len(self.rows):
            return
        index = torch.tensor(keep, device=self.mask.device)
        self.cache.batch_select_indices(index)
        self.mask = self.mask[index]
        self.rows = [self.rows[i] for i in keep]
        self.lengths = [self.lengths[i] for i in keep]
        padding = int(self.mask.shape[1] - max(self.lengths))  # columns no row uses
        if padding > 0:
            self.mask = self.mask[:, padding:]
            for layer in self.cache.layers:
                layer.keys = layer.keys[..., padding:, :]
                layer.values = layer.values[..., padding:, :]
