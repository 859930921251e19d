"""Activations by their Hugging Face config names."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from epd.models.layers import fused


class QuickGELU(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.sigmoid(1.702 * x)


_ACTIVATIONS = {
    "silu": nn.SiLU,
    "gelu": nn.GELU,
    "quick_gelu": QuickGELU,
    "gelu_pytorch_tanh": lambda: nn.GELU(approximate="tanh"),
}


def get_activation(name: str) -> nn.Module:
    if name not in _ACTIVATIONS:
        raise ValueError(f"unsupported activation {name!r}; supported: {sorted(_ACTIVATIONS)}")
    return _ACTIVATIONS[name]()


class SiluAndMul(nn.Module):
    """SwiGLU on a fused gate_up projection: silu(gate) * up."""

    def forward(self, gate_up: torch.Tensor) -> torch.Tensor:
        if fused.use_fused(gate_up):
            return fused.ops().silu_and_mul(gate_up)  # one kernel, no [gate | up] split copies
        gate, up = gate_up.chunk(2, dim=-1)
        return F.silu(gate) * up
