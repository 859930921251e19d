"""Incremental detokenization equals a full decode, also across multi-byte characters."""

from __future__ import annotations

import random

from epd.engine.detokenizer import IncrementalDetokenizer
from epd.inputs.tokenizer import Tokenizer
from epd.testing.tokenizer import build_qwen_tokenizer


def test_incremental_text_equals_full_decode(tmp_path):
    build_qwen_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    rng = random.Random(0)
    texts = ["héllo wörld, 日本語のテキスト 🙂 and more", "plain ascii words only", "ü" * 7 + " 🙂🙂"]
    # Real text (multi-byte characters split across byte tokens) and random token soup.
    sequences = [tokenizer.encode(t) for t in texts]
    sequences += [[rng.randrange(tokenizer.vocab_size) for _ in range(60)] for _ in range(20)]
    for ids in sequences:
        for skip in (True, False):
            detok, text = IncrementalDetokenizer(), ""
            for n in range(1, len(ids) + 1):
                text += detok.step(tokenizer.decode, ids[:n], skip)
                full = tokenizer.decode(ids[:n], skip)
                assert full.startswith(text)  # never shows text that a later token revises
            assert text == tokenizer.decode(ids, skip).rstrip("\ufffd") or text == tokenizer.decode(ids, skip)


def test_step_without_new_tokens_returns_nothing(tmp_path):
    build_qwen_tokenizer(tmp_path)
    tokenizer = Tokenizer.from_pretrained(tmp_path)
    ids = tokenizer.encode("héllo wörld 🙂")
    detok, text = IncrementalDetokenizer(), ""
    for n in range(1, len(ids) + 1):
        text += detok.step(tokenizer.decode, ids[:n], True)
        assert detok.step(tokenizer.decode, ids[:n], True) == ""  # a second read adds nothing
    assert text == tokenizer.decode(ids, True)
