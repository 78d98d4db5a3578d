"""Log probabilities of the tokens chosen (OpenAI's `logprobs` / `top_logprobs`): scored on
the device with the step that chose them, for the rows that asked, in the same pipelined
flow as the tokens (read on the host only when the step is complete).

A token's log probability is under the model's distribution with the tokens the row may not
choose taken out (the logits as masked for the choice: suppressed tokens, a grammar's), before
temperature, top-k and top-p, as vLLM reports them by default.
"""

from dataclasses import dataclass
from functools import lru_cache

import torch
from transformers.convert_slow_tokenizer import bytes_to_unicode

from workers.contract import Logprob, TokenLogprob

MOST_ALTERNATIVES = 20  # OpenAI's limit on top_logprobs


@dataclass
class Scores:
    """A step's scores: every row's chosen token's log probability, and the likeliest
    alternatives (as many as the row that asked most wants)."""

    chosen: torch.Tensor  # [rows]
    top_values: torch.Tensor  # [rows, k]
    top_ids: torch.Tensor  # [rows, k]

    def to_host(self) -> "Scores":
        def host(t: torch.Tensor) -> torch.Tensor:
            return t.to("cpu", non_blocking=True) if t.device.type == "cuda" else t

        return Scores(host(self.chosen), host(self.top_values), host(self.top_ids))


def score(wanted: list[int | None], logits: torch.Tensor, tokens: torch.Tensor) -> Scores | None:
    """The scores of a step whose rows chose `tokens` from `logits` (as masked for the
    choice); None when no row asked (`wanted`: each row's number of alternatives, or None)."""
    asked = [k for k in wanted if k is not None]
    if not asked:
        return None
    logprobs = torch.log_softmax(logits.float(), dim=-1)
    chosen = logprobs.gather(1, tokens.unsqueeze(1)).squeeze(1)
    top = logprobs.topk(max(asked), dim=-1)
    return Scores(chosen, top.values, top.indices)


class Speller:
    """Token ids as text and bytes, one token at a time (cached). A byte-level BPE token's
    bytes are its own, though they may be part of a character (its text then shows U+FFFD);
    another tokenizer's are its text's."""

    def __init__(self, tokenizer):
        self._tokenizer = tokenizer
        self._bytes = {char: byte for byte, char in bytes_to_unicode().items()}
        self.spell = lru_cache(maxsize=65536)(self._spell)

    def _spell(self, token: int) -> tuple[str, tuple[int, ...]]:
        text = self._tokenizer.decode([token])
        piece = self._tokenizer.convert_ids_to_tokens(token)
        if token in self._tokenizer.all_special_ids or not all(c in self._bytes for c in piece):
            return text, tuple(text.encode())
        return text, tuple(self._bytes[c] for c in piece)

    def entry(self, scores: Scores, row: int, token: int, alternatives: int) -> TokenLogprob:
        """Row `row`'s chosen token (`token`) with its `alternatives` likeliest ones."""
        text, raw = self.spell(token)
        top = []
        for value, other in zip(
            scores.top_values[row, :alternatives].tolist(),
            scores.top_ids[row, :alternatives].tolist(),
            strict=True,
        ):
            if value == float("-inf"):  # fewer tokens allowed than alternatives asked for
                break
            other_text, other_raw = self.spell(other)
            top.append(Logprob(token=other_text, logprob=value, bytes=list(other_raw)))
        logprob = float(scores.chosen[row])
        return TokenLogprob(token=text, logprob=logprob, bytes=list(raw), top=top)
