"""Turning a stream of token ids into a stream of text, with stop strings."""

from collections.abc import Callable

# A UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens.
MAX_INCOMPLETE_TOKENS = 4
REPLACEMENT = "\ufffd"


class Detokenizer:
    """Decodes token ids incrementally and emits only text that is final.

    Text ending in an incomplete UTF-8 sequence is held back for a few tokens; text that
    could be the beginning of a stop string is held back until it is known not to be.
    When a stop string appears, the text before it is emitted and `stopped` becomes True.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._emitted = 0  # characters of the decoded text already emitted
        self._pending_tokens = 0
        self.stopped = False

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        self._pending_tokens += 1
        text = self._decode(self._ids)
        if text.endswith(REPLACEMENT) and self._pending_tokens < MAX_INCOMPLETE_TOKENS:
            return ""
        self._pending_tokens = 0
        return self._release(text, final=False)

    def flush(self) -> str:
        """The end of generation: everything not yet emitted (up to a stop string)."""
        if self.stopped:
            return ""
        return self._release(self._decode(self._ids), final=True)

    def _release(self, text: str, final: bool) -> str:
        for stop in self._stop:
            at = text.find(stop, self._emitted)
            if at >= 0:
                self.stopped = True
                out, self._emitted = text[self._emitted : at], at
                return out
        end = len(text)
        if not final:
            end -= self._stop_prefix_length(text)
        out = text[self._emitted : end]
        self._emitted = max(self._emitted, end)
        return out

    def _stop_prefix_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        longest = 0
        for stop in self._stop:
            for n in range(min(len(stop) - 1, len(text) - self._emitted), 0, -1):
                if text.endswith(stop[:n]):
                    longest = max(longest, n)
                    break
        return longest
