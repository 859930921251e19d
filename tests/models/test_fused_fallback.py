"""The torch paths behind the fused layer helpers are exactly the ops they replace, so the
CPU engine stays token-exact against transformers (the GPU kernels are checked in tests/gpu)."""

from __future__ import annotations

import torch
from torch import nn

from epd.models.layers import fused
from epd.models.layers.attention import varlen_attention
from epd.models.layers.norm import RMSNorm
from epd.models.qwen2_vl_vision import add_norm


def test_add_rms_norm_is_the_add_then_the_norm():
    norm = RMSNorm(64)
    norm.weight.data.normal_(1.0, 0.1)
    x, residual = torch.randn(2, 7, 64), torch.randn(2, 7, 64)
    out, total = fused.add_rms_norm(x, residual, norm)
    assert torch.equal(total, residual + x) and torch.equal(out, norm(residual + x))


def test_vision_add_norm_without_residual_and_with_layer_norm():
    x, residual = torch.randn(5, 32), torch.randn(5, 32)
    norm = nn.LayerNorm(32)
    out, total = add_norm(x, None, norm)
    assert total is x and torch.equal(out, norm(x))
    out, total = add_norm(x, residual, norm)
    assert torch.equal(total, residual + x) and torch.equal(out, norm(residual + x))


def test_varlen_attention_single_run_equals_per_segment():
    q, k, v = (torch.randn(24, 2, 8) for _ in range(3))
    cu = [0, 8, 16, 24]  # one run of three equal segments: the no-copy path
    out = varlen_attention(q, k, v, cu)
    for a, b in zip(cu[:-1], cu[1:]):
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t[a:b].transpose(0, 1) for t in (q, k, v))
        ).transpose(0, 1)
        torch.testing.assert_close(out[a:b], ref)
