"""Text <-> token ids, straight from a checkpoint's `tokenizer.json`.

A thin wrapper over the `tokenizers` library: no transformers at serving time. For the
Qwen2 family, transformers' `Qwen2Tokenizer` rebuilds exactly the pipeline that the
checkpoint's tokenizer.json already describes (NFC, regex split + byte-level BPE,
byte-level decoder), so loading the file directly gives the same ids and text
(tests/inputs/test_tokenizer.py checks against `AutoTokenizer`).
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence

import tokenizers

# The named special tokens a tokenizer config may set; chat templates see them by these names.
SPECIAL_TOKEN_NAMES = (
    "bos_token",
    "eos_token",
    "unk_token",
    "sep_token",
    "pad_token",
    "cls_token",
    "mask_token",
)


class Tokenizer:
    """Encode and decode with a checkpoint's tokenizer.

    `encode` adds no special tokens of its own, and special tokens written in the text (like
    `<|image_pad|>`) become their single ids. `vocab_size` counts added tokens too, so every id
    `encode` can return is below it.
    """

    def __init__(
        self, backend: tokenizers.Tokenizer, special_tokens: dict[str, str], model_max_length: int | None
    ):
        self._tok = backend
        self.special_tokens = special_tokens  # e.g. {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}
        self.model_max_length = model_max_length
        self.all_special_ids = sorted(i for i, t in backend.get_added_tokens_decoder().items() if t.special)

    @classmethod
    def from_pretrained(cls, model_dir: str | os.PathLike) -> Tokenizer:
        """Load `model_dir/tokenizer.json`; special tokens from tokenizer_config.json (or the legacy map)."""
        backend = tokenizers.Tokenizer.from_file(os.path.join(model_dir, "tokenizer.json"))
        config = _read_json(os.path.join(model_dir, "tokenizer_config.json"))
        legacy = _read_json(os.path.join(model_dir, "special_tokens_map.json"))
        special = {}
        for name in SPECIAL_TOKEN_NAMES:
            value = _token_content(config[name] if name in config else legacy.get(name))
            if value is not None:
                special[name] = value
        max_len = config.get("model_max_length")
        # transformers writes a huge float sentinel when the length is unknown.
        max_len = int(max_len) if isinstance(max_len, (int, float)) and max_len < 1e12 else None
        return cls(backend, special, max_len)

    def encode(self, text: str) -> list[int]:
        """Token ids of `text`, special tokens in the text included, none added."""
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of `ids`; special tokens are dropped unless `skip_special_tokens` is False."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        return self._tok.id_to_token(token_id)

    @property
    def vocab_size(self) -> int:
        """Number of ids, added tokens included (what `len(AutoTokenizer)` gives)."""
        return self._tok.get_vocab_size(with_added_tokens=True)

    @property
    def eos_token_id(self) -> int | None:
        return self._special_id("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._special_id("bos_token")

    @property
    def pad_token_id(self) -> int | None:
        return self._special_id("pad_token")

    def _special_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self._tok.token_to_id(token)


def _token_content(value: object) -> str | None:
    # Configs write a token as a string or as a serialised AddedToken {"content": ..., ...}.
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict:
    if not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        return json.load(f)
