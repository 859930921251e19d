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
# Single-row projections through the Triton GEMV (decode at batch 1); `EPD_GEMV=0`: cuBLAS.
GEMV = os.environ.get("EPD_GEMV", "1") != "0"
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


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, norm: torch.nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x): a residual add and the RMSNorm after it.

    `norm` is an `epd.models.layers.norm.RMSNorm`. One kernel on the GPU; elsewhere exactly the
    two ops it replaces (the sum in the model dtype, then the norm), so CPU results do not move.
    """
    if use_fused(x):
        return ops().add_rms_norm(x, residual, norm.weight, norm.eps)
    total = residual + x
    return norm(total), total


def linear(x: torch.Tensor, layer: torch.nn.Linear) -> torch.Tensor:
    """`layer(x)`; one row on the GPU goes through the Triton GEMV, which streams the weight
    faster than cuBLAS's single-row kernels (decode at batch 1 is almost all weight reads)."""
    if GEMV and use_fused(x) and x.dim() == 2 and x.shape[0] == 1:
        return ops().gemv(x, layer.weight, layer.bias)
    return layer(x)
