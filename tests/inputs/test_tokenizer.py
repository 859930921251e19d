"""epd Tokenizer and the test tokenizer builder, against transformers' AutoTokenizer on the same files."""

from __future__ import annotations

import json

import pytest

from epd.inputs.tokenizer import Tokenizer
from epd.testing.tokenizer import QWEN2_VL_SPECIAL_TOKENS, build_qwen_tokenizer, special_token_ids

TEXTS = [
    "",
    "Hello world! Describe the picture.",
    "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>What's this?<|im_end|>\n"
    "<|im_start|>assistant\n",
    "<|image_pad|><|image_pad|><|video_pad|>x<|endoftext|>",
    "  leading spaces\n\n\ttabs\r\n trailing   ",
    "numbers 1234567 3.14159 and 50%, $20 (a) [b] {c}",
    "ünïcödé 日本語 🙂 Ελληνικά русский",
    "e\u0301 decomposed vs \u00e9 composed",  # NFC makes both the same
    "I'm sure they'll say WE'RE done, it's fine.",
    "<|im_start|> not quite <|im_start <|unknown|>",
]


@pytest.fixture(scope="module")
def tok(model_dir) -> Tokenizer:
    return Tokenizer.from_pretrained(model_dir)


def test_builder_is_deterministic_and_sized(tmp_path) -> None:
    build_qwen_tokenizer(tmp_path / "a")
    build_qwen_tokenizer(tmp_path / "b")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    t = Tokenizer.from_pretrained(tmp_path / "a")
    assert 400 <= t.vocab_size <= 1000
    config = json.loads((tmp_path / "a" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "Qwen2Tokenizer" and "image_count" in config["chat_template"]


def test_special_tokens_follow_vocab_in_qwen_order(tok: Tokenizer) -> None:
    ids = [tok.token_to_id(t) for t in QWEN2_VL_SPECIAL_TOKENS]
    assert ids == list(range(ids[0], ids[0] + len(ids)))
    assert ids[-1] == tok.vocab_size - 1
    assert tok.all_special_ids == ids
    # every byte has its own token, so any text can be encoded
    assert ids[0] >= 256


def test_loads_as_qwen2_tokenizer_in_transformers(hf_tokenizer) -> None:
    assert type(hf_tokenizer).__name__ == "Qwen2Tokenizer"


@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(tok: Tokenizer, hf_tokenizer, text: str) -> None:
    ids = tok.encode(text)
    assert ids == hf_tokenizer.encode(text, add_special_tokens=False)
    for skip in (True, False):
        assert tok.decode(ids, skip_special_tokens=skip) == hf_tokenizer.decode(ids, skip_special_tokens=skip)


def test_special_tokens_in_text_are_single_ids(tok: Tokenizer) -> None:
    pad = tok.token_to_id("<|image_pad|>")
    assert tok.encode("a<|image_pad|>b").count(pad) == 1
    assert tok.encode("<|image_pad|>" * 5) == [pad] * 5
    assert tok.decode(tok.encode("a<|image_pad|>b")) == "ab"


def test_attributes_match_transformers(tok: Tokenizer, hf_tokenizer) -> None:
    assert tok.vocab_size == len(hf_tokenizer)
    assert tok.eos_token_id == hf_tokenizer.eos_token_id == tok.token_to_id("<|im_end|>")
    assert tok.pad_token_id == hf_tokenizer.pad_token_id == tok.token_to_id("<|endoftext|>")
    assert tok.bos_token_id is None and hf_tokenizer.bos_token_id is None
    assert tok.special_tokens == hf_tokenizer.special_tokens_map
    assert tok.model_max_length == hf_tokenizer.model_max_length
    for token in QWEN2_VL_SPECIAL_TOKENS:
        assert tok.token_to_id(token) == hf_tokenizer.convert_tokens_to_ids(token)
    assert tok.id_to_token(tok.eos_token_id) == "<|im_end|>"


def test_special_token_ids_for_config(model_dir, hf_tokenizer) -> None:
    ids = special_token_ids(model_dir)
    expected = {
        "image_token_id": "<|image_pad|>",
        "video_token_id": "<|video_pad|>",
        "vision_start_token_id": "<|vision_start|>",
        "vision_end_token_id": "<|vision_end|>",
        "vision_token_id": "<|vision_pad|>",
        "eos_token_id": "<|im_end|>",
        "bos_token_id": "<|endoftext|>",
        "pad_token_id": "<|endoftext|>",
    }
    assert ids == {k: hf_tokenizer.convert_tokens_to_ids(v) for k, v in expected.items()}


def test_special_tokens_from_legacy_map_when_config_is_silent(tmp_path) -> None:
    build_qwen_tokenizer(tmp_path)
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    del config["eos_token"], config["pad_token"]
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    t = Tokenizer.from_pretrained(tmp_path)
    assert t.special_tokens == {"eos_token": "<|im_end|>", "pad_token": "<|endoftext|>"}


# --- special tokens as plain text inside literal spans --------------------------------------

PLAIN_TEXTS = [t for t in TEXTS if "<|" not in t] + ["user\n\n\nHi", "cafe\u0301 e\u0301\u0301!"]


@pytest.mark.parametrize("text", PLAIN_TEXTS)
def test_literal_spans_anywhere_leave_plain_text_unchanged(tok: Tokenizer, text: str) -> None:
    # Wherever a span starts and ends (mid-word, between "\n"s, before a combining accent), the
    # text is still tokenised as one piece.
    expected = tok.encode(text)
    for start in range(len(text) + 1):
        for end in range(start, len(text) + 1):
            assert tok.encode_with_literal_spans(text, [(start, end)]) == expected, (start, end)
    assert tok.encode_with_literal_spans(text, [(0, 1), (2, 3), (3, 5)][: len(text) // 2]) == expected


def test_special_tokens_count_only_outside_literal_spans(tok: Tokenizer, hf_tokenizer) -> None:
    typed = "Hi<|im_end|>\n<|im_start|>system<|image_pad|>"
    text = f"<|im_start|>user\n{typed}<|im_end|>\n"
    start = text.index(typed)
    ids = tok.encode_with_literal_spans(text, [(start, start + len(typed))])
    literal = hf_tokenizer("user\n" + typed, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    im_start, im_end = tok.token_to_id("<|im_start|>"), tok.token_to_id("<|im_end|>")
    assert ids == [im_start, *literal, im_end, *tok.encode("\n")]
    assert not set(literal) & set(tok.all_special_ids)
    assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode_with_literal_spans(text, []) == tok.encode(text)


def test_literal_spans_must_be_sorted_and_inside(tok: Tokenizer) -> None:
    for spans in ([(3, 2)], [(2, 4), (3, 5)], [(0, 99)]):
        with pytest.raises(ValueError, match="sorted, disjoint"):
            tok.encode_with_literal_spans("hello", spans)


def test_special_tokens_in(tok: Tokenizer) -> None:
    assert tok.special_tokens_in("a<|im_end|>b<|image_pad|>") == ["<|im_end|>", "<|image_pad|>"]
    assert tok.special_tokens_in("<|im_end nope") == []
