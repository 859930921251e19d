"""When the layers use the fused Triton kernels (epd.models.layers.triton_ops).

On a CUDA tensor with Triton installed, and unless `EPD_FUSED=0` is set (or `ENABLED` is
turned off, as the benchmark does to measure the difference); everything else (the CPU,
CI) runs the plain torch code, which stays the reference.
"""

from __future__ import annotations

import importlib.util
import os
from types import ModuleType

import torch

ENABLED = os.environ.get("EPD_FUSED", "1") != "0" and importlib.util.find_spec("triton") is not None
_ops: ModuleType | None = None


def use_fused(x: torch.Tensor) -> bool:
    return ENABLED and x.is_cuda


def ops() -> ModuleType:
    """The kernel module, imported on first use (importing Triton costs a second)."""
    global _ops
    if _ops is None:
        from epd.models.layers import triton_ops

        _ops = triton_ops
    return _ops
