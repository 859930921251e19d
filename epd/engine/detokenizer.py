"""Incremental detokenization: the new text of each step without decoding the whole output.

Decoding a request's full output every step costs O(n) per token, O(n^2) per request.
Instead two short windows are decoded: the text of the tokens already shown and the text
with the new tokens; the difference is the new text, held back while it ends in an
incomplete UTF-8 sequence (U+FFFD). As in vLLM. The final text is still a full decode
(`stop.py`), so what users get never depends on this shortcut.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

Decode = Callable[[Sequence[int], bool], str]


@dataclass
class IncrementalDetokenizer:
    prefix_offset: int = 0  # start of the window that gives the new text its context
    read_offset: int = 0  # tokens up to here are already in the text

    def step(self, decode: Decode, ids: Sequence[int], skip_special_tokens: bool) -> str:
        """New text since the last call (possibly empty). Idempotent: with no new token it
        returns "" without decoding, so callers may refresh as often as they read."""
        if self.read_offset == len(ids):
            return ""
        shown = decode(ids[self.prefix_offset : self.read_offset], skip_special_tokens)
        window = decode(ids[self.prefix_offset :], skip_special_tokens)
        if len(window) > len(shown) and not window.endswith("\ufffd"):
            self.prefix_offset, self.read_offset = self.read_offset, len(ids)
            return window[len(shown) :]
        return ""
