"""The fused Triton layer kernels against the torch code they replace, on random inputs.

On a CUDA GPU; on a CPU only under Triton's interpreter (TRITON_INTERPRET=1, triton
installed), where float16 stands in for bfloat16 (the interpreter mistakes bf16 bits).
Bars: float32 rel. error < 1e-5; 16-bit formats < 1e-2 (in practice a few ulp apart).
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from epd.models.layers import fused
from epd.models.layers.activation import SiluAndMul
from epd.models.layers.norm import RMSNorm
from epd.models.layers.rotary import apply_rotary

CUDA = torch.cuda.is_available()
pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(
        importlib.util.find_spec("triton") is None or not (CUDA or os.environ.get("TRITON_INTERPRET") == "1"),
        reason="needs a CUDA GPU with triton (or TRITON_INTERPRET=1)",
    ),
]
DEVICE = torch.device("cuda" if CUDA else "cpu")
DTYPES = [torch.float32, torch.bfloat16 if CUDA else torch.float16]
BAR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}


def torch_reference(fn, *args):
    """The layer's plain torch path (the fused kernels switched off)."""
    saved, fused.ENABLED = fused.ENABLED, False
    try:
        return fn(*args)
    finally:
        fused.ENABLED = saved


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert out.dtype == ref.dtype and out.shape == ref.shape
    assert not out.isnan().any()
    return ((out.double() - ref.double()).norm() / ref.double().norm()).item()


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3584), (37, 1280), (5, 3, 64), (300, 100)])
def test_rms_norm(dtype, shape):
    norm = RMSNorm(shape[-1], eps=1e-6).to(DEVICE, dtype)
    norm.weight.data.normal_(1.0, 0.1)
    x = (torch.randn(shape, device=DEVICE) * 3).to(dtype)
    out = fused.ops().rms_norm(x, norm.weight, norm.eps)
    assert rel_err(out, torch_reference(norm, x)) < BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 28, 128), (19, 4, 128), (64, 16, 80), (7, 2, 16)])
def test_rotary_on_strided_views(dtype, shape):
    tokens, heads, dim = shape
    qkv = torch.randn(tokens, 3 * heads * dim, device=DEVICE).to(dtype)
    x = qkv[:, heads * dim : 2 * heads * dim].view(tokens, heads, dim)  # a slice, as the model's q/k
    angles = torch.rand(tokens, dim // 2, device=DEVICE) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1).to(dtype) for f in (torch.cos, torch.sin))
    out = fused.ops().rotary(x, cos, sin)
    assert rel_err(out, torch_reference(apply_rotary, x, cos, sin)) < BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 2 * 18944), (33, 2 * 3420), (4, 2, 2 * 100)])
def test_silu_and_mul(dtype, shape):
    x = (torch.randn(shape, device=DEVICE) * 2).to(dtype)
    out = fused.ops().silu_and_mul(x)
    assert rel_err(out, torch_reference(SiluAndMul(), x)) < BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(1, 3584), (37, 1280), (5, 3, 64), (300, 100)])
def test_add_rms_norm_gives_sum_and_norm(dtype, shape):
    norm = RMSNorm(shape[-1], eps=1e-6).to(DEVICE, dtype)
    norm.weight.data.normal_(1.0, 0.1)
    x, residual = ((torch.randn(shape, device=DEVICE) * 3).to(dtype) for _ in range(2))
    out, total = fused.ops().add_rms_norm(x, residual, norm.weight, norm.eps)
    ref_out, ref_total = torch_reference(fused.add_rms_norm, x, residual, norm)
    assert torch.equal(total, ref_total)  # one rounding of the same float32 sum
    assert rel_err(out, ref_out) < BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES[1:])
@pytest.mark.parametrize("shape", [(64, 16, 80), (9, 2, 16)])
def test_rotary_in_float32_rounded_once(dtype, shape):
    """The vision tower's rotation: float32 math on 16-bit q/k, one rounding at the end."""
    tokens, heads, dim = shape
    qkv = torch.randn(tokens, 3 * heads, dim, device=DEVICE).to(dtype)
    x = qkv[:, : 2 * heads]  # q and k heads together, a strided view
    angles = torch.rand(tokens, dim // 2, device=DEVICE) * 6
    cos, sin = (torch.cat([f(angles)] * 2, dim=-1) for f in (torch.cos, torch.sin))
    out = fused.ops().rotary(x, cos, sin, out_dtype=dtype)
    ref = torch_reference(apply_rotary, x.float(), cos, sin).to(dtype)
    assert out.is_contiguous() and rel_err(out, ref) < BAR[dtype]
    with pytest.raises(ValueError):
        fused.ops().rotary(x, cos.to(dtype), sin.to(dtype), out_dtype=torch.float32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(64, 128), (100, 300), (4608, 1024)])
@pytest.mark.parametrize("bias", [False, True])
def test_gemv_is_linear(dtype, shape, bias):
    layer = torch.nn.Linear(shape[1], shape[0], bias=bias).to(DEVICE, dtype)
    x = torch.randn(1, shape[1], device=DEVICE).to(dtype)
    ref = torch.nn.functional.linear(
        x.double(), layer.weight.double(), None if not bias else layer.bias.double()
    )
    for config in [None, (4, 128, 4), (32, 256, 8)]:
        out = fused.ops().gemv(x, layer.weight, layer.bias, config)
        assert out.dtype == dtype and rel_err(out.double(), ref) < BAR[dtype]
    assert rel_err(fused.linear(x, layer), torch_reference(fused.linear, x, layer)) < BAR[dtype]
