"""The longest prompt text that could still fit the context, known before tokenizing.

Tokenizing holds the GIL (the `tokenizers` library's `encode`), and so do the Python steps
over every token after it: a 21 MB prompt froze the whole server for 18 s before it was
refused for its length. A bound on characters refuses it at once, and never refuses a
prompt that fits:

    a token covers at most L bytes of normalised text       (L: the longest token, in bytes)
    normalising (NFC, NFKC...) leaves at least one byte per two characters
    => tokens >= characters / (2 L);  more than 2 L (max_model_len - 1) characters never fit

Why one byte per two characters: normalising composes characters (e + U+0301 -> é), and each
composed character, at least two bytes long, stands for at most four code points
(tests/server/test_request_limits.py checks every code point). Without a normaliser a character
is at least one byte, so the factor is 1.

The byte bound holds for byte-level BPE tokenizers (Qwen, GPT-2, Llama 3), whose pre-tokenizers
keep every byte; for any other pipeline `TextBound.max_chars` is None and nothing is refused
here (the token count still is, after tokenizing).
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass

from epd.server.errors import bad_request
from epd.server.protocol import ChatMessage, TextPart

# Normalisers that only compose or decompose Unicode (see the docstring's factor).
_NORMAL_FORMS = {"NFC", "NFD", "NFKC", "NFKD"}
# Pre-tokenizers that keep every byte of the text; a Split keeps them unless it removes matches.
_KEEPING_PRE_TOKENIZERS = {"ByteLevel", "Split", "Digits", "Punctuation"}
_END_WINDOW = 1024


@dataclass(frozen=True)
class TextBound:
    """`max_chars`: more characters than this can never fit; None when the tokenizer gives no bound."""

    max_chars: int | None
    max_model_len: int

    @classmethod
    def from_model_dir(cls, model_dir: str | os.PathLike, max_model_len: int) -> TextBound:
        """From the checkpoint's tokenizer.json (the file epd.inputs.tokenizer loads)."""
        path = os.path.join(model_dir, "tokenizer.json")
        with open(path, encoding="utf-8") as f:
            spec = json.load(f)
        per_token = max_chars_per_token(spec)
        max_chars = None if per_token is None else per_token * (max_model_len - 1)
        return cls(max_chars, max_model_len)

    def check(self, num_chars: int, param: str) -> None:
        """400 when `num_chars` characters of prompt text could never fit the context."""
        if self.max_chars is not None and num_chars > self.max_chars:
            raise bad_request(
                f"the prompt is too long: {num_chars} characters cannot fit this model's maximum context "
                f"length of {self.max_model_len} tokens (at most {self.max_chars} characters could); "
                "shorten it",
                param,
            )


def max_chars_per_token(spec: dict) -> int | None:
    """2 L (or L without a normaliser) for a byte-level BPE tokenizer.json, else None (no bound)."""
    model = spec.get("model") or {}
    pre_tokenizers = _steps(spec.get("pre_tokenizer"))
    normalizers = _steps(spec.get("normalizer"))
    byte_level = any(step.get("type") == "ByteLevel" for step in pre_tokenizers)
    if model.get("type") != "BPE" or not byte_level or not all(_keeps_bytes(s) for s in pre_tokenizers):
        return None
    if not all(step.get("type") in _NORMAL_FORMS for step in normalizers):
        return None
    # Byte-level vocabularies write one character per byte; added tokens are matched as text.
    longest = max((len(token) for token in model.get("vocab") or {}), default=1)
    added = (len(str(t.get("content", "")).encode()) for t in spec.get("added_tokens") or [])
    longest = max(longest, *added, 1)
    return longest * (2 if normalizers else 1)


def chat_text_chars(messages: list[ChatMessage]) -> int:
    """Characters of the messages' text, as a chat template renders it at least.

    Templates write each text once; some strip it (Jinja's `trim`), so the outer whitespace
    of a text is not counted.
    """
    total = 0
    for message in messages:
        if isinstance(message.content, str):
            total += _stripped_len(message.content)
        else:
            total += sum(_stripped_len(p.text) for p in message.content if isinstance(p, TextPart))
    return total


def _stripped_len(text: str) -> int:
    """len(text.strip()), copying only the ends of a long text (unless they are all whitespace)."""
    if len(text) <= 2 * _END_WINDOW:
        return len(text.strip())
    head, tail = text[:_END_WINDOW], text[-_END_WINDOW:]
    lead, trail = len(head) - len(head.lstrip()), len(tail) - len(tail.rstrip())
    if lead == _END_WINDOW or trail == _END_WINDOW:
        return len(text.strip())
    return len(text) - lead - trail


def _steps(component: dict | None) -> list[dict]:
    """A tokenizer.json component as its list of steps ([] for none)."""
    if not component:
        return []
    kind = component.get("type")
    if kind == "Sequence":
        children = component.get("pretokenizers") or component.get("normalizers") or []
        return [step for child in children for step in _steps(child)]
    return [component]


def _keeps_bytes(step: dict) -> bool:
    kind = step.get("type")
    if kind == "Split":
        return step.get("behavior") != "Removed"
    return kind in _KEEPING_PRE_TOKENIZERS
