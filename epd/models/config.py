"""The parts of a Hugging Face `config.json` our Qwen-VL family code needs, as frozen dataclasses.

Checkpoints come in two shapes: the original flat one (text fields at the top level,
`rope_scaling.mrope_section`, `rope_theta`) and transformers 5's nested one
(`text_config`, `rope_parameters`). Both are read into the same objects here so the
model code never looks at raw JSON.

| field                     | Qwen2-VL / Qwen2.5-VL     | Qwen3-VL                                 |
|---------------------------|---------------------------|------------------------------------------|
| text `head_dim`           | hidden / heads            | `head_dim` of the config                 |
| text `attention_bias`     | True (q/k/v have biases)  | False                                    |
| text `qk_norm`            | False                     | True: RMSNorm of each q and k head       |
| text `mrope_interleaved`  | False: t, h, w sections   | True: t/h/w bands interleaved            |
| vision `variant`          | "qwen2_vl", "qwen2_5_vl"  | "qwen3_vl"                               |
| vision `deepstack_...`    | ()                        | blocks whose outputs also feed the LLM   |

InternVL (transformers' format: `vision_config` of InternViT, a Qwen2 `text_config`, the pixel
shuffle's `downsample_ratio` at the top level) reads into the same objects: a Qwen2 `TextConfig`
whose M-RoPE bands all read the width row (`mrope_section` (0, 0, head_dim / 2): plain 1-D RoPE,
see epd.models.internvl), and a `VisionConfig` of variant "internvl" whose `internvl` field holds
what only InternViT has; `spatial_merge_size` is 1 / downsample_ratio.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from epd.models.registry import INTERNVL, QWEN2_VL, QWEN3_VL, check_architecture


@dataclass(frozen=True)
class TextConfig:
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    rms_norm_eps: float
    rope_theta: float
    mrope_section: tuple[int, int, int]
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str = "silu"
    explicit_head_dim: int | None = None  # Qwen3's `head_dim`; None: hidden / heads
    attention_bias: bool = True
    qk_norm: bool = False
    mrope_interleaved: bool = False

    @property
    def head_dim(self) -> int:
        return self.explicit_head_dim or self.hidden_size // self.num_attention_heads


@dataclass(frozen=True)
class InternVisionOptions:
    """What InternViT and InternVL's projector have that the Qwen towers do not."""

    image_size: int  # a tile's side in pixels: the position embedding covers exactly one tile
    norm_type: str  # "layer_norm" (InternViT-300M) or "rms_norm" (InternViT-6B)
    layer_norm_eps: float
    attention_bias: bool
    qk_norm: bool  # RMSNorm over all heads of q and of k (InternViT-6B)
    final_norm: bool  # a LayerNorm after the last block (`use_mean_pooling` False)
    projector_hidden_act: str


@dataclass(frozen=True)
class VisionConfig:
    """Vision tower shape. `variant` is "qwen2_vl" (LayerNorm + GELU MLP, full attention in
    every block), "qwen2_5_vl" (RMSNorm + gated MLP, window attention except in
    `fullatt_block_indexes`) or "qwen3_vl" (LayerNorm + GELU MLP, full attention, a learned
    position embedding, and a deepstack merger after each block in `deepstack_visual_indexes`)."""

    variant: str
    depth: int
    hidden_size: int  # width of the vision blocks
    intermediate_size: int
    num_heads: int
    out_hidden_size: int  # the LLM's hidden size, what the merger projects to
    hidden_act: str
    patch_size: int = 14
    temporal_patch_size: int = 2
    spatial_merge_size: int = 2
    in_channels: int = 3
    window_size: int = 0
    fullatt_block_indexes: tuple[int, ...] = ()
    rope_theta: float = 10000.0
    num_position_embeddings: int = 0  # Qwen3-VL's learned (square) position grid, side**2
    deepstack_visual_indexes: tuple[int, ...] = ()
    internvl: InternVisionOptions | None = None

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_heads

    @property
    def patch_dim(self) -> int:
        """Length of one flattened patch: channels x frames x pixels."""
        return self.in_channels * self.temporal_patch_size * self.patch_size * self.patch_size


@dataclass(frozen=True)
class VLModelConfig:
    architecture: str
    text: TextConfig
    vision: VisionConfig
    image_token_id: int
    video_token_id: int | None
    vision_start_token_id: int | None
    eos_token_ids: tuple[int, ...]

    @property
    def mm_embed_width(self) -> int:
        """Width of one image token's embedding as the encoder produces, caches and sends it:
        the merger's output, then one more LLM-width slice per deepstack level (Qwen3-VL)."""
        return self.vision.out_hidden_size * (1 + len(self.vision.deepstack_visual_indexes))

    @classmethod
    def from_pretrained(cls, model_dir: str | Path) -> VLModelConfig:
        raw = json.loads((Path(model_dir) / "config.json").read_text())
        return cls.from_dict(raw)

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> VLModelConfig:
        architecture = check_architecture(raw.get("architectures") or [])
        text_raw = {**raw, **raw.get("text_config", {})}
        return cls(
            architecture=architecture,
            text=_text_config(architecture, text_raw, raw),
            vision=_vision_config(architecture, raw.get("vision_config", {}), raw),
            image_token_id=_first_int(raw, text_raw, "image_token_id"),
            video_token_id=_optional_int(raw, text_raw, "video_token_id"),
            vision_start_token_id=_optional_int(raw, text_raw, "vision_start_token_id"),
            eos_token_ids=_as_tuple(text_raw.get("eos_token_id")),
        )


def _text_config(architecture: str, text: dict[str, Any], top: dict[str, Any]) -> TextConfig:
    rope = text.get("rope_parameters") or text.get("rope_scaling") or {}
    theta = rope.get("rope_theta", text.get("rope_theta", 1_000_000.0))
    qwen3 = architecture == QWEN3_VL
    section = rope.get("mrope_section", [24, 20, 20] if qwen3 else [16, 24, 24])
    if architecture == INTERNVL:
        section = _plain_rope_section(text, rope)
    tie = text.get("tie_word_embeddings", top.get("tie_word_embeddings", False))
    return TextConfig(
        vocab_size=text["vocab_size"],
        hidden_size=text["hidden_size"],
        intermediate_size=text["intermediate_size"],
        num_hidden_layers=text["num_hidden_layers"],
        num_attention_heads=text["num_attention_heads"],
        num_key_value_heads=text.get("num_key_value_heads", text["num_attention_heads"]),
        rms_norm_eps=text.get("rms_norm_eps", 1e-6),
        rope_theta=float(theta),
        mrope_section=tuple(section),
        max_position_embeddings=text.get("max_position_embeddings", 32768),
        tie_word_embeddings=bool(tie),
        hidden_act=text.get("hidden_act", "silu"),
        explicit_head_dim=text.get("head_dim") if qwen3 else None,
        attention_bias=bool(text.get("attention_bias", not qwen3)),
        qk_norm=qwen3,
        # transformers' Qwen3-VL always interleaves (it reads no flag); the flag is informative.
        mrope_interleaved=qwen3 or bool(rope.get("mrope_interleaved", False)),
    )


def _plain_rope_section(text: dict[str, Any], rope: dict[str, Any]) -> list[int]:
    """A 1-D RoPE LLM as M-RoPE whose bands all read the width row (InternVL's images are strips
    of one row, their tokens numbered along it like text). "dynamic" (NTK) scaling changes
    nothing below `max_position_embeddings`, which bounds the context."""
    kind = rope.get("rope_type", rope.get("type", "default"))
    if kind not in ("default", "dynamic"):
        raise ValueError(f"InternVL's language model: unsupported rope_type {kind!r}")
    return [0, 0, text["hidden_size"] // text["num_attention_heads"] // 2]


def _vision_config(architecture: str, v: dict[str, Any], top: dict[str, Any]) -> VisionConfig:
    if architecture == INTERNVL:
        return _internvl_vision_config(v, top)
    common = dict(
        depth=v["depth"],
        num_heads=v["num_heads"],
        patch_size=v.get("patch_size", v.get("spatial_patch_size", 14)),
        temporal_patch_size=v.get("temporal_patch_size", 2),
        spatial_merge_size=v.get("spatial_merge_size", 2),
        in_channels=v.get("in_channels", v.get("in_chans", 3)),
        rope_theta=float((v.get("rope_parameters") or {}).get("rope_theta", 10000.0)),
    )
    if architecture == QWEN2_VL:
        # Qwen2-VL names the block width embed_dim and the output width hidden_size.
        embed_dim = v["embed_dim"]
        return VisionConfig(
            variant="qwen2_vl",
            hidden_size=embed_dim,
            intermediate_size=int(embed_dim * v.get("mlp_ratio", 4)),
            out_hidden_size=v["hidden_size"],
            hidden_act=v.get("hidden_act", "quick_gelu"),
            **common,
        )
    if architecture == QWEN3_VL:
        return VisionConfig(
            variant="qwen3_vl",
            hidden_size=v["hidden_size"],
            intermediate_size=v["intermediate_size"],
            out_hidden_size=v["out_hidden_size"],
            hidden_act=v.get("hidden_act", "gelu_pytorch_tanh"),
            num_position_embeddings=v.get("num_position_embeddings", 2304),
            deepstack_visual_indexes=tuple(v.get("deepstack_visual_indexes", (8, 16, 24))),
            **{**common, "patch_size": v.get("patch_size", 16)},
        )
    return VisionConfig(
        variant="qwen2_5_vl",
        hidden_size=v["hidden_size"],
        intermediate_size=v["intermediate_size"],
        out_hidden_size=v["out_hidden_size"],
        hidden_act=v.get("hidden_act", "silu"),
        window_size=v.get("window_size", 112),
        fullatt_block_indexes=tuple(v.get("fullatt_block_indexes", ())),
        **common,
    )


def _internvl_vision_config(v: dict[str, Any], top: dict[str, Any]) -> VisionConfig:
    """InternViT's fields; refuses the feature choices epd does not implement (no released
    "-hf" checkpoint uses them)."""
    layer = top.get("vision_feature_layer", -1)
    strategy = top.get("vision_feature_select_strategy", "default")
    if layer != -1 or strategy != "default":
        raise ValueError(
            f"InternVL: only vision_feature_layer -1 and select strategy 'default' are supported, "
            f"got {layer!r}, {strategy!r}"
        )
    norm_type = v.get("norm_type", "layer_norm")
    if norm_type not in ("layer_norm", "rms_norm"):
        raise ValueError(f"InternVL: unknown vision norm_type {norm_type!r}")
    image_size, patch_size = _side(v.get("image_size", 448)), _side(v.get("patch_size", 14))
    options = InternVisionOptions(
        image_size=image_size,
        norm_type=norm_type,
        layer_norm_eps=float(v.get("layer_norm_eps", 1e-6)),
        attention_bias=bool(v.get("attention_bias", False)),
        qk_norm=bool(v.get("use_qk_norm", False)),
        final_norm=not v.get("use_mean_pooling", True),
        projector_hidden_act=top.get("projector_hidden_act", "gelu"),
    )
    text = top.get("text_config", {})
    return VisionConfig(
        variant="internvl",
        depth=v.get("num_hidden_layers", 24),
        hidden_size=v.get("hidden_size", 1024),
        intermediate_size=v.get("intermediate_size", 4096),
        num_heads=v.get("num_attention_heads", 16),
        out_hidden_size=text.get("hidden_size", top.get("hidden_size")),
        hidden_act=v.get("hidden_act", "gelu"),
        patch_size=patch_size,
        temporal_patch_size=1,
        spatial_merge_size=round(1 / top.get("downsample_ratio", 0.5)),
        in_channels=v.get("num_channels", 3),
        internvl=options,
    )


def _side(value: int | list[int]) -> int:
    """One side of a square size given as an int or [height, width]."""
    if isinstance(value, (list, tuple)):
        if len(set(value)) != 1:
            raise ValueError(f"InternVL: square image and patch sizes only, got {value}")
        return int(value[0])
    return int(value)


def _first_int(*dicts_and_key: Any) -> int:
    *dicts, key = dicts_and_key
    value = _optional_int(*dicts, key)
    if value is None:
        raise ValueError(f"config.json has no {key!r}")
    return value


def _optional_int(*dicts_and_key: Any) -> int | None:
    *dicts, key = dicts_and_key
    for d in dicts:
        if d.get(key) is not None:
            return int(d[key])
    return None


def _as_tuple(value: int | list[int] | None) -> tuple[int, ...]:
    if value is None:
        return ()
    return tuple(value) if isinstance(value, list) else (int(value),)
