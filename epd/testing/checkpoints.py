"""Tiny random-weight Qwen2-VL / Qwen2.5-VL / Qwen3-VL / InternVL checkpoints, saved as real Hugging
Face directories.

Built with transformers' own classes and `save_pretrained`, so epd's loader is tested
against the format transformers writes, and transformers can serve as the reference on
exactly the same weights. All families get the same tiny tokenizer and (Qwen2-VL) chat
template: Qwen3-VL's vision tokens are the same ones, and the tests write prompts directly.
InternVL's tokenizer adds its image tokens (<img>, </img>, <IMG_CONTEXT>) and has its own template.
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


# ---- InternVL (transformers' format) --------------------------------------------------------

# Tokens InternVL's "-hf" tokenizers add after Qwen2's, in their order.
INTERNVL_EXTRA_TOKENS = (
    "<img>",
    "</img>",
    "<IMG_CONTEXT>",
    "<quad>",
    "</quad>",
    "<ref>",
    "</ref>",
    "<box>",
    "</box>",
)
# The chat template of the InternVL "-hf" checkpoints (one <IMG_CONTEXT> per image part).
INTERNVL_CHAT_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<IMG_CONTEXT>\\n' }}"
    "{% elif content['type'] == 'video' %}{{ '<video>\\n' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\\n'}}{% endfor %}{% if add_generation_prompt %}{{'<|im_start|>assistant\\n' }}{% endif %}"
)
# 64 px tiles of 8 px patches: 8 x 8 patches, 4 x 4 = 16 tokens a tile after the pixel shuffle;
# at most 6 tiles (+ thumbnail), so images have 1, 3, 4, 5, 7... tiles at small pixel counts.
INTERNVL_PREPROCESSOR = {
    "crop_to_patches": False,  # as the real ones: InternVLProcessor asks for tiles anyway
    "min_patches": 1,
    "max_patches": 6,
    "size": {"height": 64, "width": 64},
    "resample": 3,
    "rescale_factor": 1 / 255,
    "image_mean": [0.485, 0.456, 0.406],
    "image_std": [0.229, 0.224, 0.225],
    "do_convert_rgb": True,
    "image_processor_type": "GotOcr2ImageProcessor",
    "processor_class": "InternVLProcessor",
}
INTERNVL_VISION = dict(
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=2,
    image_size=64,
    patch_size=8,
    attention_bias=True,
)
# InternViT-6B's switches (InternVL2-26B's tower): RMSNorm, q/k norm, no q/k/v bias, final norm.
INTERNVL_HEAVY_VISION = dict(
    INTERNVL_VISION, norm_type="rms_norm", use_qk_norm=True, attention_bias=False, use_mean_pooling=False
)


def build_tiny_internvl_checkpoint(
    out_dir: str | Path,
    *,
    seed: int = 0,
    heavy_vision: bool = False,
    tie_word_embeddings: bool = False,
    weight_std: float = 0.1,
) -> Path:
    """A complete InternVL "-hf" directory (transformers' `InternVLForConditionalGeneration`):
    config, safetensors, a Qwen2 tokenizer with InternVL's image tokens and chat template, the
    tiling preprocessor config. `heavy_vision`: InternViT-6B's layer types instead of 300M's."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = build_internvl_tokenizer(out)
    vocab = json.loads((out / "tokenizer.json").read_text())["added_tokens"][-1]["id"] + 1
    model = _hf_internvl(ids, vocab, seed, heavy_vision, tie_word_embeddings, weight_std)
    model.save_pretrained(out)
    (out / "preprocessor_config.json").write_text(json.dumps(INTERNVL_PREPROCESSOR, indent=2))
    tokens = (64 // 8 // 2) ** 2
    (out / "processor_config.json").write_text(json.dumps({"image_seq_length": tokens}, indent=2))
    generation = {"eos_token_id": [ids["eos_token_id"], ids["pad_token_id"]], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2))
    return out


def build_internvl_tokenizer(out: Path) -> dict[str, int]:
    """The tiny Qwen2 tokenizer plus InternVL's tokens, named in tokenizer_config.json as
    transformers' InternVL tokenizers name them; returns the ids a config needs."""
    from tokenizers import AddedToken, Tokenizer

    build_qwen_tokenizer(out)
    tokenizer = Tokenizer.from_file(str(out / "tokenizer.json"))
    tokenizer.add_special_tokens(
        [AddedToken(t, special=True, normalized=False) for t in INTERNVL_EXTRA_TOKENS]
    )
    tokenizer.save(str(out / "tokenizer.json"))
    config = json.loads((out / "tokenizer_config.json").read_text())
    for token in INTERNVL_EXTRA_TOKENS:
        config["added_tokens_decoder"][str(tokenizer.token_to_id(token))] = {
            **next(iter(config["added_tokens_decoder"].values())),
            "content": token,
        }
    config["extra_special_tokens"] = {
        "start_image_token": "<img>",
        "end_image_token": "</img>",
        "context_image_token": "<IMG_CONTEXT>",
        "video_token": "<video>",
    }
    config["chat_template"] = INTERNVL_CHAT_TEMPLATE
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {**special_token_ids(out), "image_token_id": tokenizer.token_to_id("<IMG_CONTEXT>")}


def _hf_internvl(
    ids: dict[str, int], vocab: int, seed: int, heavy: bool, tie: bool, std: float
) -> torch.nn.Module:
    from transformers import InternVLConfig, InternVLForConditionalGeneration

    text = dict(
        TEXT,
        model_type="qwen2",
        vocab_size=vocab,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
        tie_word_embeddings=tie,
        eos_token_id=ids["eos_token_id"],
        bos_token_id=ids["bos_token_id"],
        pad_token_id=None,
        initializer_range=std,
    )
    vision = dict(INTERNVL_HEAVY_VISION if heavy else INTERNVL_VISION, initializer_range=std)
    config = InternVLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["image_token_id"],
        image_seq_length=(64 // 8 // 2) ** 2,
        tie_word_embeddings=tie,
    )
    config.architectures = ["InternVLForConditionalGeneration"]
    config.initializer_range = std
    torch.manual_seed(seed)
    model = InternVLForConditionalGeneration(config).eval()
    with torch.no_grad():
        # transformers starts these at zero / a constant: random values make a test see them.
        for name, param in model.named_parameters():
            if name.endswith(("cls_token", "position_embeddings", "lambda_1", "lambda_2")):
                param.normal_(0.0, 1.0 if "lambda" in name else std)
    return model


def hf_internvl_processor(model_dir: str | Path) -> object:
    """transformers' InternVLProcessor of a tiny InternVL directory, the reference for prompt ids
    and tiles. Built without its video processor, which needs torchvision (not installed)."""
    from transformers import AutoTokenizer, InternVLProcessor
    from transformers.models.got_ocr2.image_processing_pil_got_ocr2 import GotOcr2ImageProcessorPil

    class ImagesOnlyInternVLProcessor(InternVLProcessor):
        def __init__(self, image_processor, tokenizer, image_seq_length=256, chat_template=None):
            super().__init__(image_processor, tokenizer, None, image_seq_length, chat_template)

    seq_length = json.loads((Path(model_dir) / "processor_config.json").read_text())["image_seq_length"]
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    images = GotOcr2ImageProcessorPil.from_pretrained(model_dir)
    return ImagesOnlyInternVLProcessor(images, tokenizer, image_seq_length=seq_length)
