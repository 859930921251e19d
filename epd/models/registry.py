"""Which Hugging Face `architectures` epd can serve, and the class that serves each."""

from __future__ import annotations

from collections.abc import Sequence

from torch import nn

QWEN2_VL = "Qwen2VLForConditionalGeneration"
QWEN2_5_VL = "Qwen2_5_VLForConditionalGeneration"

SUPPORTED_ARCHITECTURES = (QWEN2_VL, QWEN2_5_VL)


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
    # Both generations share one implementation; the vision variant comes from the config.
    from epd.models.qwen2_vl import Qwen2VLForConditionalGeneration

    return Qwen2VLForConditionalGeneration
