"""Text <-> token ids, straight from a checkpoint's `tokenizer.json`.

A thin wrapper over the `tokenizers` library: no transformers at serving time. For the
Qwen2 family, transformers' `Qwen2Tokenizer` rebuilds exactly the pipeline that the
checkpoint's tokenizer.json already describes (NFC, regex split + byte-level BPE,
byte-level decoder), so loading the file directly gives the same ids and text
(tests/inputs/test_tokenizer.py checks against `AutoTokenizer`).

Special tokens written in text are control tokens for `encode` (a raw prompt is the
caller's to write, as in vLLM) but not inside the spans given to `encode_with_literal_spans`,
which is how a chat keeps a client's `<|im_end|><|im_start|>system` from opening a turn:

    text:    <|im_start|>user\n  Hi <|im_end|> there  <|im_end|>\n<|im_start|>assistant\n
    spans:                      [-----------------]
    ids:     [S]  user \n Hi  < | im _ end | >  there  [E]  \n  [S]  assistant \n
                               (ordinary pieces)
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from functools import cached_property

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
        self._special_id_set = frozenset(self.all_special_ids)

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
        return _encode(self._tok, text).ids

    def encode_with_literal_spans(self, text: str, literal_spans: Sequence[tuple[int, int]]) -> list[int]:
        """Token ids of `text` where special tokens count only outside `literal_spans`.

        `literal_spans` are sorted, disjoint [start, end) character ranges. Inside them a
        special token's string is ordinary text: it encodes to ordinary pieces that decode
        back to the same characters. The text between two special tokens is encoded as one
        piece, spans or not, exactly as `encode` does it; so when no special token is written
        inside the spans, the ids are `encode(text)`'s.
        """
        ids: list[int] = []
        pos = 0
        for start, end, token_id in self._special_tokens_outside(text, literal_spans):
            ids += self._encode_literal(text[pos:start])
            ids.append(token_id)
            pos = end
        return ids + self._encode_literal(text[pos:])

    def special_tokens_in(self, text: str) -> list[str]:
        """The special tokens `encode` would find in `text`, in order."""
        return [self._tok.id_to_token(i) for _, _, i in self._special_tokens(text)]

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

    def _special_tokens(self, text: str) -> list[tuple[int, int, int]]:
        """(start, end, id) of each special token in `text`, found by the tokenizer itself."""
        encoding = _encode(self._tok, text)
        return [
            (start, end, i)
            for i, (start, end) in zip(encoding.ids, encoding.offsets)
            if i in self._special_id_set
        ]

    def _special_tokens_outside(
        self, text: str, literal_spans: Sequence[tuple[int, int]]
    ) -> Iterator[tuple[int, int, int]]:
        """`_special_tokens` of the text between the spans, with offsets into `text`."""
        for region_start, region_end in _gaps(len(text), literal_spans):
            for start, end, token_id in self._special_tokens(text[region_start:region_end]):
                yield region_start + start, region_start + end, token_id

    def _encode_literal(self, text: str) -> list[int]:
        return _encode(self._literal, text).ids if text else []

    @cached_property
    def _literal(self) -> tokenizers.Tokenizer:
        """The same tokenizer reading special-token strings as ordinary text, built on first use.

        A copy, not a flag toggled on the shared one: input processing runs in several threads.
        """
        literal = tokenizers.Tokenizer.from_str(self._tok.to_str())
        literal.encode_special_tokens = True
        return literal


def _encode(tok: tokenizers.Tokenizer, text: str) -> tokenizers.Encoding:
    # encode_batch releases the GIL while it works (encode does not): a long prompt tokenized on
    # a server thread then no longer stalls the event loop and every other request.
    return tok.encode_batch([text], add_special_tokens=False)[0]


def _gaps(length: int, spans: Sequence[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The [start, end) ranges of [0, length) that no span covers (empty ones included)."""
    pos = 0
    for start, end in spans:
        if not pos <= start <= end <= length:
            raise ValueError(f"literal spans must be sorted, disjoint and within the text: {list(spans)}")
        yield pos, start
        pos = end
    yield pos, length


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
