"""A tiny but real Qwen2-style tokenizer for tests, trained at call time.

`build_qwen_tokenizer(out_dir)` writes the files a Qwen2-VL checkpoint carries
(`tokenizer.json`, `tokenizer_config.json` with the real Qwen2-VL chat template,
`special_tokens_map.json`): a byte-level BPE trained on a fixed English corpus with
Qwen2's normaliser, pre-tokeniser and decoder, and Qwen2's special tokens appended after
the learned vocabulary in Qwen's order. Same corpus -> same files, in well under a second.
`special_token_ids(out_dir)` gives the ids a test `config.json` needs.
"""

from __future__ import annotations

import json
import os

from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

# Qwen2's pre-tokenisation regex (tokenizer.json of every Qwen2 / Qwen2-VL checkpoint).
PRETOKENIZE_REGEX = (
    r"""(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"""
    r"""| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"""
)

# In Qwen's order, so the offsets from the first one match the real checkpoint (151643 + i there).
QWEN2_VL_SPECIAL_TOKENS = (
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|object_ref_start|>",
    "<|object_ref_end|>",
    "<|box_start|>",
    "<|box_end|>",
    "<|quad_start|>",
    "<|quad_end|>",
    "<|vision_start|>",
    "<|vision_end|>",
    "<|vision_pad|>",
    "<|image_pad|>",
    "<|video_pad|>",
)

# The chat template shipped with Qwen2-VL-*-Instruct and Qwen2.5-VL-*-Instruct.
QWEN2_VL_CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}"
    "{% if add_vision_id %}Picture {{ image_count.value }}: {% endif %}"
    "<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}"
    "{% if add_vision_id %}Video {{ video_count.value }}: {% endif %}"
    "<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)

_CORPUS = """\
You are a helpful assistant. The user sends a picture and asks a question about it.
Describe the image in detail. What is in this picture? How many people are there?
The assistant looks at the image and answers: there is a small red car parked near a
tall green tree, and two people are walking their dog along the river in the morning.
A cat is sleeping on the warm window sill while the sun shines through the glass.
The quick brown fox jumps over the lazy dog. Pack my box with five dozen liquor jugs.
Please read the text in the image and translate it into English. The sign says: open
from nine in the morning until six in the evening, every day except Sunday.
Compare the two images and tell me what is different between the first and the second.
In the first image the sky is blue and clear; in the second it is grey and cloudy.
Count the objects on the table: three apples, two bananas, one orange and a bottle of water.
Where was this photo taken? It looks like a busy street in a large city, with shops,
buses, bicycles and many people crossing the road at the traffic lights.
Write a short story about the picture. Once upon a time, a little girl found a key
under an old stone in the garden, and she wondered which door it would open.
The model answers questions about images, reads charts and tables, and explains what
it sees. It should be honest when it is not sure, and say so instead of guessing.
Numbers: 0 1 2 3 4 5 6 7 8 9 10 12 24 100 2024 3.14 50% $20 (a) [b] {c} <d> "e" 'f'.
"""


def build_qwen_tokenizer(out_dir: str | os.PathLike) -> None:
    """Write tokenizer.json, tokenizer_config.json and special_tokens_map.json into `out_dir`."""
    os.makedirs(out_dir, exist_ok=True)
    tokenizer = _train_tokenizer()
    save_qwen_tokenizer(tokenizer, out_dir)


def special_token_ids(out_dir: str | os.PathLike) -> dict[str, int]:
    """Ids under the `config.json` key names Qwen2-VL uses, read from `out_dir/tokenizer.json`."""
    tokenizer = Tokenizer.from_file(os.path.join(out_dir, "tokenizer.json"))

    def tid(token: str) -> int:
        return tokenizer.token_to_id(token)

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


def _train_tokenizer(vocab_size: int = 640) -> Tokenizer:
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
        vocab_size=vocab_size,
        min_frequency=1,
        show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tokenizer.train_from_iterator(_CORPUS.splitlines(keepends=True), trainer=trainer)
    # Added after training, so they take the ids right after the learned vocabulary, as in Qwen.
    tokenizer.add_special_tokens(list(QWEN2_VL_SPECIAL_TOKENS))
    return tokenizer


def save_qwen_tokenizer(tokenizer: Tokenizer, out_dir: str | os.PathLike) -> None:
    """Write the files of a Qwen2-VL checkpoint's tokenizer: tokenizer.json, tokenizer_config.json
    (with the chat template) and special_tokens_map.json."""
    tokenizer.save(os.path.join(out_dir, "tokenizer.json"))
    _write_json(os.path.join(out_dir, "tokenizer_config.json"), _tokenizer_config(tokenizer))
    _write_json(os.path.join(out_dir, "special_tokens_map.json"), _special_tokens_map())


def _tokenizer_config(tokenizer: Tokenizer) -> dict:
    added = {
        str(tokenizer.token_to_id(tok)): {
            "content": tok,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
            "special": True,
        }
        for tok in QWEN2_VL_SPECIAL_TOKENS
    }
    return {
        "add_prefix_space": False,
        "added_tokens_decoder": added,
        "additional_special_tokens": list(QWEN2_VL_SPECIAL_TOKENS[1:]),
        "bos_token": None,
        "chat_template": QWEN2_VL_CHAT_TEMPLATE,
        "clean_up_tokenization_spaces": False,
        "eos_token": "<|im_end|>",
        "errors": "replace",
        "model_max_length": 32768,
        "pad_token": "<|endoftext|>",
        "split_special_tokens": False,
        "tokenizer_class": "Qwen2Tokenizer",
        "unk_token": None,
    }


def _special_tokens_map() -> dict:
    def token(content: str) -> dict:
        return {
            "content": content,
            "lstrip": False,
            "normalized": False,
            "rstrip": False,
            "single_word": False,
        }

    return {
        "additional_special_tokens": list(QWEN2_VL_SPECIAL_TOKENS[1:]),
        "eos_token": token("<|im_end|>"),
        "pad_token": token("<|endoftext|>"),
    }


def _write_json(path: str, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
