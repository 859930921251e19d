"""Normalisation layers, numerically as Hugging Face computes them."""

from __future__ import annotations

import torch
from torch import nn

from epd.models.layers import fused


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if fused.use_fused(x):
            return fused.ops().rms_norm(x, self.weight, self.eps)  # one kernel instead of eight
        # Statistics in float32 whatever the model dtype, then back before the scale (as HF does).
        dtype = x.dtype
        x32 = x.float()
        x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * x32.to(dtype)
