"""The demo tokenizer: Qwen's special tokens and template, and one token per task word."""

from __future__ import annotations

import json

import pytest

from epd.demo import DEMO_MODEL_DIR
from epd.demo.shapes import COLOURS, KINDS, chat_messages, multi_image_sample
from epd.demo.tokenizer import special_token_ids, train_tokenizer, write_tokenizer
from epd.inputs.tokenizer import Tokenizer
from epd.testing.tokenizer import QWEN2_VL_CHAT_TEMPLATE, QWEN2_VL_SPECIAL_TOKENS


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer()


def test_task_words_are_single_tokens_with_and_without_a_space(tokenizer):
    for word in [*COLOURS, *KINDS, "image"]:
        assert len(tokenizer.encode(word).ids) == 1, word
        assert len(tokenizer.encode(" " + word).ids) == 1, word


def test_answers_are_compact_and_round_trip(tokenizer):
    answer = multi_image_sample(4).answer
    ids = tokenizer.encode(answer).ids
    assert len(ids) <= len(answer.split()) * 2
    assert tokenizer.decode(ids) == answer


def test_special_tokens_follow_the_vocabulary_in_qwen_order(tokenizer):
    first = tokenizer.token_to_id(QWEN2_VL_SPECIAL_TOKENS[0])
    assert [tokenizer.token_to_id(t) for t in QWEN2_VL_SPECIAL_TOKENS] == list(
        range(first, first + len(QWEN2_VL_SPECIAL_TOKENS))
    )
    assert first + len(QWEN2_VL_SPECIAL_TOKENS) == tokenizer.get_vocab_size()


def test_written_files_load_in_epd_with_the_real_template(tmp_path):
    written = write_tokenizer(tmp_path)
    loaded = Tokenizer.from_pretrained(tmp_path)
    ids = special_token_ids(written)
    assert loaded.eos_token_id == ids["eos_token_id"] == written.token_to_id("<|im_end|>")
    assert loaded.pad_token_id == ids["pad_token_id"]
    text = "<|vision_start|><|image_pad|><|vision_end|>What shapes are in this image?"
    assert loaded.encode(text)[:3] == [
        ids["vision_start_token_id"],
        ids["image_token_id"],
        ids["vision_end_token_id"],
    ]
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    assert config["chat_template"] == QWEN2_VL_CHAT_TEMPLATE


def test_shipped_checkpoint_has_exactly_this_tokenizer(tokenizer):
    shipped = json.loads((DEMO_MODEL_DIR / "tokenizer.json").read_text())
    assert shipped == json.loads(tokenizer.to_str())
    config = json.loads((DEMO_MODEL_DIR / "config.json").read_text())
    assert config["text_config"]["vocab_size"] == tokenizer.get_vocab_size()


def test_transformers_renders_the_same_prompt_as_epd():
    from transformers import AutoTokenizer

    from epd.inputs.processor import InputProcessor

    messages = chat_messages(multi_image_sample(1))
    hf = AutoTokenizer.from_pretrained(DEMO_MODEL_DIR)
    text = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    processor = InputProcessor.from_pretrained(DEMO_MODEL_DIR)
    assert text == processor.chat_template.render(messages).text
    assert hf.encode(text, add_special_tokens=False) == processor.tokenizer.encode(text)
