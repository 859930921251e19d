"""Which Hugging Face `architectures` epd can serve, and the class that serves each."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

QWEN2_VL = "Qwen2VLForConditionalGeneration"
QWEN2_5_VL = "Qwen2_5_VLForConditionalGeneration"
QWEN3_VL = "Qwen3VLForConditionalGeneration"  # dense only (Qwen3-VL-MoE is another architecture)
INTERNVL = "InternVLForConditionalGeneration"  # transformers' format ("-hf" checkpoints), Qwen2 LLM

SUPPORTED_ARCHITECTURES = (QWEN2_VL, QWEN2_5_VL, QWEN3_VL, INTERNVL)


def check_architecture(architectures: Sequence[str]) -> str:
    """The first supported entry of a config's `architectures`, or a clear error."""
    for arch in architectures:
        if arch in SUPPORTED_ARCHITECTURES:
            return arch
    raise ValueError(
        f"unsupported model architecture {list(architectures)}; "
        f"epd supports: {', '.join(SUPPORTED_ARCHITECTURES)}"
    )


def get_model_class(architecture: str) -> type[nn.Module]:
    check_architecture([architecture])
    if architecture == QWEN3_VL:
        from epd.models.qwen3_vl import Qwen3VLForConditionalGeneration

        return Qwen3VLForConditionalGeneration
    if architecture == INTERNVL:
        from epd.models.internvl import InternVLForConditionalGeneration

        return InternVLForConditionalGeneration
    # Qwen2-VL and Qwen2.5-VL share one implementation; the vision variant comes from the config.
    from epd.models.qwen2_vl import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration
