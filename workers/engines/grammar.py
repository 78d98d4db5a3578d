"""Structured output in the transformers engine: a request's `OutputFormat` compiled into a
grammar (llguidance, over the model's own tokenizer), whose matcher masks the row's logits
before each token is chosen, so the answer is JSON (valid against the schema) whenever it
ends by itself.

Compiling runs in the calling thread (not billed); a schema llguidance cannot enforce in full
is refused, naming what it could not. The answer is compact (no whitespace between tokens of
JSON). Ending is the grammar's call: the stop tokens are allowed exactly when the answer is
complete, even where the model's generation config suppresses them.
"""

import json
from functools import cached_property

import torch

from workers.contract import OutputFormat
from workers.engines.base import InvalidRequest

COMPACT = {"whitespace_flexible": False}
BITS = torch.arange(32, dtype=torch.int32)


class Grammars:
    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]):
        self.hf_tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_ids = sorted(stop_ids)

    @cached_property
    def tokenizer(self):
        import llguidance.hf

        return llguidance.hf.from_tokenizer(
            self.hf_tokenizer, n_vocab=self.vocab_size, eos_token=self.stop_ids
        )

    def matcher(self, output_format: OutputFormat):
        """A fresh matcher of the format's grammar; a schema that cannot be enforced is the
        request's fault (400), named by its field."""
        import llguidance

        schema = output_format.schema_text if output_format.kind == "json_schema" else None
        try:
            grammar = llguidance.LLMatcher.grammar_from_json_schema(
                schema or json.dumps({"type": "object"}), defaults=COMPACT
            )
        except (ValueError, TypeError) as exc:  # not a schema llguidance can read
            raise InvalidRequest(f"field '{output_format.field}': {exc}") from None
        error = llguidance.LLMatcher.validate_grammar(grammar, self.tokenizer)
        if error:
            raise InvalidRequest(
                f"field '{output_format.field}': the JSON schema cannot be used: {error}"
            )
        return llguidance.LLMatcher(self.tokenizer, grammar, log_level=0)

    def constrain(self, logits: torch.Tensor, matchers: list, suppressed: torch.Tensor) -> None:
        """`logits` ([rows, vocabulary]) as row i may choose from: without a matcher, every
        token but the `suppressed` ones; with one, only what its grammar allows next."""
        if suppressed.numel():
            if any(m is not None for m in matchers):
                free = torch.tensor([m is None for m in matchers]).to(logits.device)
                columns = torch.zeros(logits.shape[1], dtype=torch.bool, device=logits.device)
                columns[suppressed] = True
                logits.masked_fill_(free.unsqueeze(1) & columns.unsqueeze(0), float("-inf"))
            else:
                logits.index_fill_(1, suppressed, float("-inf"))
        self._mask(logits, matchers)

    def _mask(self, logits: torch.Tensor, matchers: list) -> None:
        """Leave each constrained row only the tokens its grammar allows next (once its answer
        is complete, only the stop tokens); rows without a matcher are untouched."""
        import llguidance.torch

        rows = [i for i, m in enumerate(matchers) if m is not None]
        if not rows:
            return
        bitmask = llguidance.torch.allocate_token_bitmask(len(rows), self.vocab_size)
        for slot, row in enumerate(rows):
            llguidance.torch.fill_next_token_bitmask(matchers[row], bitmask, slot)
        # one bit a token, 32 tokens a word: unpacked into a [rows, vocabulary] mask
        allowed = ((bitmask.unsqueeze(-1) >> BITS) & 1).flatten(1)[:, : logits.shape[1]]
        index = torch.tensor(rows).to(logits.device)
        blocked = allowed.to(logits.device) == 0
        logits[index] = logits[index].masked_fill(blocked, float("-inf"))
