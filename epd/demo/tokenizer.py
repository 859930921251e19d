"""The demo model's tokenizer: Qwen2's byte-level BPE pipeline, trained on the task's own text.

Same normaliser, pre-tokeniser, decoder, special tokens (in Qwen's order) and chat template
as a real Qwen2.5-VL checkpoint (shared with `epd.testing.tokenizer`), but the merges are
learnt from the chat template's fixed text plus every word of the shapes task. BPE merges
inside pre-tokens only, so with enough merges every word the task uses ("red", " circle",
" image", ...) becomes a single token: answers are short and cheap to learn. Any other text
still encodes, byte by byte.
"""

from __future__ import annotations

import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

from epd.demo.shapes import COLOURS, KINDS, MAX_IMAGES, MULTI_QUESTION, SINGLE_QUESTION
from epd.testing.tokenizer import PRETOKENIZE_REGEX, QWEN2_VL_SPECIAL_TOKENS, save_qwen_tokenizer

# Generous: training stops by itself once every pre-token of the corpus is one token.
MAX_VOCAB = 1024


def corpus() -> list[str]:
    """The text the merges are learnt from: template text, questions, and every answer word."""
    lines = ["system\nYou are a helpful assistant.", "user\n", "assistant\n", SINGLE_QUESTION, MULTI_QUESTION]
    labels = [f"{colour} {kind}" for colour in COLOURS for kind in KINDS]
    lines += labels + [", ".join(labels)]  # each word at the start of a line and after a space
    lines += list(KINDS)
    lines += [f"image {i}: {labels[i]}; " for i in range(1, MAX_IMAGES + 1)]
    return lines


def train_tokenizer() -> Tokenizer:
    """A Qwen2-style tokenizer whose merges cover the corpus; special tokens after the vocabulary."""
    tokenizer = Tokenizer(
        models.BPE(unk_token=None, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    )
    tokenizer.normalizer = normalizers.NFC()
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(PRETOKENIZE_REGEX), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel(add_prefix_space=False, use_regex=False)
    tokenizer.post_processor = processors.ByteLevel(
        add_prefix_space=False, trim_offsets=False, use_regex=False
    )
    trainer = trainers.BpeTrainer(
        vocab_size=MAX_VOCAB,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(corpus(), trainer=trainer)
    # Added after training, so they take the ids right after the learned vocabulary, as in Qwen.
    tokenizer.add_special_tokens(list(QWEN2_VL_SPECIAL_TOKENS))
    return tokenizer


def write_tokenizer(out_dir: str | os.PathLike) -> Tokenizer:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json; return the tokenizer."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = train_tokenizer()
    save_qwen_tokenizer(tokenizer, out_dir)
    return tokenizer


def special_token_ids(tokenizer: Tokenizer) -> dict[str, int]:
    """Ids under the `config.json` key names Qwen2.5-VL uses."""
    tid = tokenizer.token_to_id
    return {
        "bos_token_id": tid("<|endoftext|>"),
        "eos_token_id": tid("<|im_end|>"),
        "pad_token_id": tid("<|endoftext|>"),
        "vision_start_token_id": tid("<|vision_start|>"),
        "vision_end_token_id": tid("<|vision_end|>"),
        "vision_token_id": tid("<|vision_pad|>"),
        "image_token_id": tid("<|image_pad|>"),
        "video_token_id": tid("<|video_pad|>"),
    }
