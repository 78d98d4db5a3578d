"""Prefilling requests together: which waiting requests go in one forward pass, their inputs
as one batch, and each one's KV cache out of the batch's.

A group's prompts are left-padded to the longest and masked, with positions counted from each
prompt's first token, so that every row computes what it would alone; its images go through
the vision tower as one batch, in the rows' order (the model fills its image tokens in that
order).
"""

import logging
import time

import torch
from transformers import DynamicCache

from workers.engines.growing_cache import CACHE
from workers.engines.llava_requests import Request

log = logging.getLogger(__name__)


def next_group(admitted: list[Request], budget: int) -> list[Request]:
    """The oldest admitted request and those closest to it in length, while the group's
    padded prompts (rows x the longest) stay within `budget` tokens; a prompt longer than
    the budget goes alone. The oldest always goes first: no request waits behind newer ones."""
    first, *others = admitted
    group, longest = [first], first.prompt_tokens
    for request in sorted(others, key=lambda r: abs(r.prompt_tokens - first.prompt_tokens)):
        wider = max(longest, request.prompt_tokens)
        if (len(group) + 1) * wider <= budget:
            group.append(request)
            longest = wider
    return group


def stacked(
    group: list[Request], pad_id: int, dtype: torch.dtype, device: torch.device
) -> dict[str, torch.Tensor]:
    """The group's inputs (each request's as `prepare` made them) as one batch on `device`."""
    columns = max(r.prompt_tokens for r in group)
    ids = torch.full((len(group), columns), pad_id, dtype=torch.long)
    mask = torch.zeros((len(group), columns), dtype=torch.long)
    for row, request in enumerate(group):
        ids[row, columns - request.prompt_tokens :] = request.inputs["input_ids"][0]
        mask[row, columns - request.prompt_tokens :] = 1
    inputs = {
        "input_ids": ids,
        "attention_mask": mask,
        "position_ids": (mask.cumsum(-1) - 1).clamp(min=0),
    }
    pixels = [r.inputs["pixel_values"] for r in group if "pixel_values" in r.inputs]
    if pixels:
        inputs["pixel_values"] = torch.cat(pixels).to(dtype)
    return {name: value.to(device) for name, value in inputs.items()}


def row_cache(cache: DynamicCache, row: int, start: int) -> DynamicCache:
    """One row of a batched prefill's cache, from column `start` on (its left padding off):
    the cache that row's prompt would have had alone, as the decode batches' `add` takes it."""
    return DynamicCache(
        [
            (layer.keys[row : row + 1, :, start:], layer.values[row : row + 1, :, start:])
            for layer in cache.layers
        ]
    )


class GroupedPrefill:
    """Prefills of `TransformersLlava`, which holds what they use: the requests admitted and
    not yet prefilled (`_admitted`), the budget (`prefill_tokens`), the model, its dtype and
    device, the meter and the counters, the decode batch the prefilled rows join (`_batch`,
    with their next input tokens, `_next`), and how tokens are chosen (`_choose`) and taken
    (`_accept`) and requests ended (`_finish`)."""

    def _prefill_next(self) -> None:
        """Prefill the next group of admitted requests; if it fails, its requests fail."""
        if not self._admitted:
            return
        group = next_group(self._admitted, self.prefill_tokens)
        self._admitted = [r for r in self._admitted if r not in group]
        try:
            self._prefill(group)
        except Exception as exc:
            log.exception("prefill of %d request(s) failed", len(group))
            for request in group:
                if not request.done.is_set():
                    self._finish(request, None, error=exc)

    @torch.inference_mode()
    def _prefill(self, group: list[Request]) -> None:
        inputs = stacked(group, self.pad_id, self.dtype, self.device)
        for request in group:
            self.meter.open(request)
        self._sync()
        started = time.perf_counter()
        for request in group:
            request.started_at = started
        out = self.model(**inputs, use_cache=True, logits_to_keep=1)
        first, scores = self._choose(group, out.logits[:, -1].float())
        tokens = first.tolist()
        self._sync()
        self.meter.charge(time.perf_counter() - started, {r: r.prompt_tokens for r in group})
        self.prefill_batches += 1
        self.prefill_rows += len(group)
        cache, columns = getattr(out, CACHE), inputs["input_ids"].shape[1]
        for row, (request, token) in enumerate(zip(group, tokens, strict=True)):
            request.inputs = {}  # the prompt now lives in the KV cache
            if self._accept(request, token, scores, row):
                own = row_cache(cache, row, columns - request.prompt_tokens)
                self._batch.add(request, own, request.prompt_tokens)
                mine = first[row : row + 1]
                self._next = mine if self._next is None else torch.cat([self._next, mine])
