"""Tiny random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL checkpoints, saved as real Hugging Face directories.

Built with transformers' own classes and `save_pretrained`, so epd's loader is tested
against the format transformers writes, and transformers can serve as the reference on
exactly the same weights. All families get the same tiny tokenizer and (Qwen2-VL) chat
template: Qwen3-VL's vision tokens are the same ones, and the tests write prompts directly.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from epd.testing.tokenizer import build_qwen_tokenizer, special_token_ids

# Small enough for CPU tests, big enough to exercise GQA, several layers, windows and full blocks.
TEXT = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    rms_norm_eps=1e-6,
    max_position_embeddings=4096,
)
ROPE = {"rope_type": "default", "rope_theta": 10000.0, "mrope_section": [2, 3, 3]}
PREPROCESSOR = {
    "min_pixels": 56 * 56,
    "max_pixels": 28 * 28 * 256,
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}
# Qwen3-VL: 16 px patches, mean/std 0.5, sizes in transformers 5's layout (as the real one writes).
QWEN3_PREPROCESSOR = {
    "size": {"shortest_edge": 64 * 64, "longest_edge": 32 * 32 * 256},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "image_processor_type": "Qwen2VLImageProcessorFast",
    "processor_class": "Qwen3VLProcessor",
}
# Qwen3's head_dim is set apart from hidden / heads (here 32, not 16) and its M-RoPE interleaved.
QWEN3_TEXT = dict(TEXT, num_hidden_layers=3, head_dim=32, attention_bias=False)
QWEN3_ROPE = {
    "rope_type": "default",
    "rope_theta": 10000.0,
    "mrope_section": [6, 5, 5],
    "mrope_interleaved": True,
}


def build_tiny_checkpoint(
    out_dir: str | Path,
    family: str = "qwen2_5_vl",
    *,
    seed: int = 0,
    tie_word_embeddings: bool = False,
    weight_std: float = 0.1,
    max_shard_size: str | None = None,
) -> Path:
    """Write a complete model directory: config, safetensors weights, tokenizer, processor config.

    `weight_std` larger than HF's 0.02 default keeps next-token distributions peaked, so that
    greedy comparisons are not decided by float rounding between near-equal logits.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    build_qwen_tokenizer(out)
    ids = special_token_ids(out)
    model = _hf_model(family, ids, seed, tie_word_embeddings, weight_std)
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(out, **kwargs)
    preprocessor = QWEN3_PREPROCESSOR if family == "qwen3_vl" else PREPROCESSOR
    (out / "preprocessor_config.json").write_text(json.dumps(preprocessor, indent=2))
    generation = {"eos_token_id": [ids["eos_token_id"], ids["pad_token_id"]], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def _hf_model(family: str, ids: dict[str, int], seed: int, tie: bool, std: float) -> torch.nn.Module:
    from transformers import (
        Qwen2_5_VLConfig,
        Qwen2_5_VLForConditionalGeneration,
        Qwen2VLConfig,
        Qwen2VLForConditionalGeneration,
        Qwen3VLConfig,
        Qwen3VLForConditionalGeneration,
    )

    vocab = max(ids.values()) + 1
    qwen3 = family == "qwen3_vl"
    text = dict(
        QWEN3_TEXT if qwen3 else TEXT,
        vocab_size=vocab,
        rope_parameters=QWEN3_ROPE if qwen3 else ROPE,
        tie_word_embeddings=tie,
        eos_token_id=ids["eos_token_id"],
        bos_token_id=ids["bos_token_id"],
        pad_token_id=None,
    )
    tokens = {
        k: ids[k]
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    if family == "qwen2_5_vl":
        # window_size 56 px = 2x2 merge groups per window; blocks 1 and 3 attend over the whole image.
        vision = dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            window_size=56,
            fullatt_block_indexes=[1, 3],
        )
        config = Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **tokens)
        cls = Qwen2_5_VLForConditionalGeneration
    elif family == "qwen2_vl":
        vision = dict(depth=2, embed_dim=32, hidden_size=64, num_heads=2, mlp_ratio=2)
        config = Qwen2VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **tokens)
        cls = Qwen2VLForConditionalGeneration
    elif qwen3:
        # An 8 x 8 learned position grid: test images have grids both smaller and larger than it.
        # Deepstack after blocks 0 and 2: levels added after LLM layers 0 and 1 (of 3).
        vision = dict(
            depth=4,
            hidden_size=32,
            intermediate_size=64,
            num_heads=2,
            out_hidden_size=64,
            patch_size=16,
            num_position_embeddings=64,
            deepstack_visual_indexes=[0, 2],
        )
        config = Qwen3VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=tie, **tokens)
        cls = Qwen3VLForConditionalGeneration
    else:
        raise ValueError(f"unknown family {family!r}; use 'qwen2_vl', 'qwen2_5_vl' or 'qwen3_vl'")
    config.initializer_range = std
    config.text_config.initializer_range = std
    config.vision_config.initializer_range = std
    torch.manual_seed(seed)
    return cls(config).eval()
