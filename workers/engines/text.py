"""Turning a stream of token ids into a stream of text, with stop strings."""

from collections.abc import Callable

# A UTF-8 character spans at most 4 bytes, so at most 4 byte-level tokens.
MAX_INCOMPLETE_TOKENS = 4
REPLACEMENT = "\ufffd"


class Detokenizer:
    """Decodes token ids incrementally and emits only text that is final.

    Each token is decoded in a small window (the previous token or so for context, as
    tokenizers whose pieces depend on their neighbours need), not the whole sequence, so the
    cost per token stays constant however long the answer grows. Text ending in an incomplete
    UTF-8 sequence is held back for a few tokens; text that could be the beginning of a stop
    string is held back until it is known not to be. When a stop string appears, the text
    before it is emitted and `stopped` becomes True.
    """

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]):
        self._decode = decode
        self._stop = [s for s in stop if s]
        self._ids: list[int] = []
        self._prefix = 0  # start of the context window
        self._read = 0  # ids before this are already in self._text
        self._text = ""  # everything decoded so far
        self._emitted = 0  # characters of self._text already emitted
        self.stopped = False

    @property
    def ids(self) -> list[int]:
        """Every token id pushed so far."""
        return self._ids

    def push(self, token_id: int) -> str:
        """Add one token; return the text that became final (possibly empty)."""
        if self.stopped:
            return ""
        self._ids.append(token_id)
        seen = self._decode(self._ids[self._prefix : self._read])
        now = self._decode(self._ids[self._prefix :])
        pending = len(self._ids) - self._read
        if now.endswith(REPLACEMENT) and pending < MAX_INCOMPLETE_TOKENS:
            return ""
        self._text += now[len(seen) :] if now.startswith(seen) else now
        self._prefix, self._read = self._read, len(self._ids)
        return self._release(final=False)

    def flush(self) -> str:
        """The end of generation: everything not yet emitted (up to a stop string)."""
        if self.stopped:
            return ""
        if self._read < len(self._ids):
            seen = self._decode(self._ids[self._prefix : self._read])
            now = self._decode(self._ids[self._prefix :])
            self._text += now[len(seen) :] if now.startswith(seen) else now
            self._read = len(self._ids)
        return self._release(final=True)

    def _release(self, final: bool) -> str:
        text = self._text
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
