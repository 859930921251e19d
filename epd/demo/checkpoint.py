"""The demo model's architecture (a small Qwen2.5-VL) and how its directory is written.

A checkpoint directory here is what a real Qwen2.5-VL-Instruct one holds, in the same
formats: `config.json` + `model.safetensors` (transformers' `save_pretrained`), the
tokenizer files with the real chat template, `preprocessor_config.json` and
`generation_config.json`.

Images of 112-224 px keep their size up to the 28 px grid (min_pixels = 112^2,
max_pixels = 224^2): 8x8 to 16x16 patches of 14 px, so 16 to 64 merged LLM tokens each,
and a 14 px patch still sees a 22 px shape's corners and edges.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from epd.demo.tokenizer import special_token_ids, write_tokenizer

MIN_PIXELS = 112 * 112
MAX_PIXELS = 224 * 224
PREPROCESSOR = {
    "min_pixels": MIN_PIXELS,
    "max_pixels": MAX_PIXELS,
    "size": {"shortest_edge": MIN_PIXELS, "longest_edge": MAX_PIXELS},
    "patch_size": 14,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "do_resize": True,
    "do_rescale": True,
    "do_normalize": True,
    "do_convert_rgb": True,
    "rescale_factor": 1 / 255,
    "resample": 3,
    "image_mean": [0.48145466, 0.4578275, 0.40821073],
    "image_std": [0.26862954, 0.26130258, 0.27577711],
    "image_processor_type": "Qwen2VLImageProcessor",
    "processor_class": "Qwen2_5_VLProcessor",
}


@dataclass(frozen=True)
class ModelSize:
    """The knobs of the architecture; everything else is Qwen2.5-VL's default."""

    text_hidden: int = 256
    text_layers: int = 4
    text_heads: int = 8
    text_kv_heads: int = 4
    text_intermediate: int = 768
    vision_hidden: int = 128
    vision_depth: int = 4
    vision_heads: int = 4
    vision_intermediate: int = 384
    window_size: int = 112  # px: 4x4 merged tokens per window, as in the real model
    fullatt_blocks: tuple[int, ...] = (1, 3)

    @property
    def mrope_section(self) -> list[int]:
        """(t, h, w) rotary pairs in Qwen's 16:24:24 proportion, summing to head_dim / 2."""
        half = self.text_hidden // self.text_heads // 2
        t = half // 4
        h = (half - t) // 2
        return [t, h, half - t - h]


SIZES = {
    "demo": ModelSize(),
    # For smoke tests of the training script: seconds per step on a CPU.
    "tiny": ModelSize(64, 1, 2, 1, 128, 32, 2, 2, 64, 112, (1,)),
}


def hf_config(size: ModelSize, ids: dict[str, int]):
    """A `Qwen2_5_VLConfig` of this size for a tokenizer with these special ids."""
    from transformers import Qwen2_5_VLConfig

    text = dict(
        vocab_size=max(ids.values()) + 1,
        hidden_size=size.text_hidden,
        intermediate_size=size.text_intermediate,
        num_hidden_layers=size.text_layers,
        num_attention_heads=size.text_heads,
        num_key_value_heads=size.text_kv_heads,
        rms_norm_eps=1e-6,
        max_position_embeddings=2048,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0, "mrope_section": size.mrope_section},
        tie_word_embeddings=False,
        eos_token_id=ids["eos_token_id"],
        bos_token_id=ids["bos_token_id"],
        pad_token_id=None,
    )
    vision = dict(
        depth=size.vision_depth,
        hidden_size=size.vision_hidden,
        intermediate_size=size.vision_intermediate,
        num_heads=size.vision_heads,
        out_hidden_size=size.text_hidden,
        window_size=size.window_size,
        fullatt_block_indexes=list(size.fullatt_blocks),
    )
    tokens = {
        k: ids[k]
        for k in ("image_token_id", "video_token_id", "vision_start_token_id", "vision_end_token_id")
    }
    return Qwen2_5_VLConfig(text_config=text, vision_config=vision, tie_word_embeddings=False, **tokens)


def init_model_dir(out_dir: str | Path, size: ModelSize, seed: int) -> tuple[torch.nn.Module, dict[str, int]]:
    """Write the tokenizer and processor files; return a freshly initialised model and the special ids.

    The processor files come first so that data workers can load epd's `InputProcessor` from
    `out_dir` while the model trains.
    """
    from transformers import Qwen2_5_VLForConditionalGeneration

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    ids = special_token_ids(write_tokenizer(out))
    _write_json(out / "preprocessor_config.json", PREPROCESSOR)
    torch.manual_seed(seed)
    return Qwen2_5_VLForConditionalGeneration(hf_config(size, ids)), ids


def save_model(model: torch.nn.Module, out_dir: str | Path, ids: dict[str, int], dtype: torch.dtype) -> None:
    """`save_pretrained` in `dtype`, plus a generation config that stops on <|im_end|> or <|endoftext|>."""
    out = Path(out_dir)
    model = model.to("cpu", dtype)
    model.save_pretrained(out)
    generation = {
        "bos_token_id": ids["bos_token_id"],
        "eos_token_id": [ids["eos_token_id"], ids["pad_token_id"]],
        "pad_token_id": ids["pad_token_id"],
        "do_sample": False,
    }
    _write_json(out / "generation_config.json", generation)


def describe(size: ModelSize, model: torch.nn.Module) -> str:
    """One line per tower: sizes and parameter counts."""
    vision = sum(p.numel() for n, p in model.named_parameters() if ".visual." in f".{n}")
    total = sum(p.numel() for p in model.parameters())
    return f"{asdict(size)}\nparameters: {total / 1e6:.2f}M total, {vision / 1e6:.2f}M vision"


def _write_json(path: Path, obj: dict) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
