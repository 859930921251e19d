"""Fused Triton kernels for the elementwise layers: RMSNorm (alone, or after the residual add),
rotary embedding, SiLU-and-mul.

Hot path, GPU only: imported through `epd.models.layers.fused` when a CUDA tensor arrives.
Each replaces a chain of 2-8 small torch kernels by one; in a decode step those chains, not
the arithmetic, are most of the time after the matmuls (thousands of ~2 us launches).

Numerics follow the torch code they replace, rounding included: wherever torch rounds an
intermediate to the model dtype (it computes each bf16 op in float32, then rounds), these
kernels round the same intermediate, so bf16 results agree with the torch path bit for bit
up to the order of the float32 sum in RMSNorm.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, stride_x, stride_o, n_cols, eps, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    var = tl.sum(x * x, 0) / n_cols
    y = (x * tl.rsqrt(var + eps)).to(x_ptr.dtype.element_ty)  # torch: x32 * rsqrt(...), .to(dtype)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)  # torch: weight * y, in the promoted dtype
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * (x * rsqrt(mean(x^2) + eps)) over the last dim, statistics in float32."""
    shape = x.shape
    x2 = x.reshape(-1, shape[-1])
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    out = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(shape[-1])
    _rms_norm_kernel[(x2.shape[0],)](
        x2,
        weight,
        out,
        x2.stride(0),
        out.stride(0),
        shape[-1],
        eps,
        BLOCK=block,
        num_warps=min(16, max(1, block // 256)),
    )
    return out.view(shape)


@triton.jit
def _add_rms_norm_kernel(
    x_ptr, r_ptr, w_ptr, out_ptr, sum_ptr, stride_x, stride_r, stride_o, stride_s, n_cols, eps,
    BLOCK: tl.constexpr,
):  # fmt: skip
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = sum_ptr.dtype.element_ty
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    r = tl.load(r_ptr + row * stride_r + cols, mask=mask, other=0.0).to(tl.float32)
    s = (r + x).to(dt)  # torch: residual + x, rounded to the dtype
    tl.store(sum_ptr + row * stride_s + cols, s, mask=mask)
    s = s.to(tl.float32)
    var = tl.sum(s * s, 0) / n_cols
    y = (s * tl.rsqrt(var + eps)).to(dt)
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    out = w.to(tl.float32) * y.to(tl.float32)
    tl.store(out_ptr + row * stride_o + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """(rms_norm(residual + x), residual + x) in one pass: the sum is written once and read
    from registers, where the unfused layer wrote it, then read it back for the norm."""
    shape = x.shape
    x2, r2 = (t.reshape(-1, shape[-1]) for t in (x, residual))
    x2, r2 = (t if t.stride(-1) == 1 else t.contiguous() for t in (x2, r2))
    total = torch.empty(x2.shape, dtype=torch.result_type(x, residual), device=x.device)
    out = torch.empty(x2.shape, dtype=torch.promote_types(total.dtype, weight.dtype), device=x.device)
    block = triton.next_power_of_2(shape[-1])
    _add_rms_norm_kernel[(x2.shape[0],)](
        x2, r2, weight, out, total, x2.stride(0), r2.stride(0), out.stride(0), total.stride(0),
        shape[-1], eps, BLOCK=block, num_warps=min(16, max(1, block // 256)),
    )  # fmt: skip
    return out.view(shape), total.view(shape)


@triton.jit
def _rotary_kernel(
    x_ptr,
    cos_ptr,
    sin_ptr,
    out_ptr,
    stride_xt,
    stride_xh,
    stride_ct,
    stride_st,
    stride_ot,
    stride_oh,
    num_heads,
    HALF: tl.constexpr,
    HALF_PAD: tl.constexpr,
    HEADS_PAD: tl.constexpr,
    ROUND: tl.constexpr,
):
    t = tl.program_id(0).to(tl.int64)
    h = tl.arange(0, HEADS_PAD)
    d = tl.arange(0, HALF_PAD)
    mask = (h[:, None] < num_heads) & (d[None, :] < HALF)
    dt = out_ptr.dtype.element_ty
    x_row = x_ptr + t * stride_xt + h[:, None] * stride_xh + d[None, :]
    x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
    c1 = tl.load(cos_ptr + t * stride_ct + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    c2 = tl.load(cos_ptr + t * stride_ct + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    s1 = tl.load(sin_ptr + t * stride_st + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    s2 = tl.load(sin_ptr + t * stride_st + HALF + d, mask=d < HALF, other=0.0).to(tl.float32)[None, :]
    # torch: x * cos + cat(-x2, x1) * sin, each product and the sum rounded to the dtype it
    # computes in (ROUND); in float32 (ROUND off) only the result is rounded, at the store.
    if ROUND:
        lo = (x1 * c1).to(dt).to(tl.float32) + (-x2 * s1).to(dt).to(tl.float32)
        hi = (x2 * c2).to(dt).to(tl.float32) + (x1 * s2).to(dt).to(tl.float32)
    else:
        lo = x1 * c1 + (-x2 * s1)
        hi = x2 * c2 + x1 * s2
    o_row = out_ptr + t * stride_ot + h[:, None] * stride_oh + d[None, :]
    tl.store(o_row, lo.to(dt), mask=mask)
    tl.store(o_row + HALF, hi.to(dt), mask=mask)


def rotary(
    x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, out_dtype: torch.dtype | None = None
) -> torch.Tensor:
    """x [tokens, heads, dim] (last dim contiguous), cos/sin [tokens, dim] -> rotated, contiguous.

    Computed in torch's result dtype of (x, cos); `out_dtype` rounds the result once more, so
    `rotary(x16, cos32, sin32, out_dtype=x16.dtype)` is `apply_rotary(x16.float(), cos32,
    sin32).to(x16.dtype)` (the vision tower's float32 rotation) without the two float32 copies.
    """
    tokens, heads, dim = x.shape
    if x.stride(-1) != 1:
        x = x.contiguous()
    cos, sin = (c if c.stride(-1) == 1 else c.contiguous() for c in (cos, sin))
    compute = torch.result_type(x, cos)
    if compute != torch.float32 and out_dtype not in (None, compute):
        raise ValueError(f"rotary computes in {compute}; it cannot round to {out_dtype} on the way")
    out = torch.empty(x.shape, dtype=out_dtype or compute, device=x.device)
    half = dim // 2
    _rotary_kernel[(tokens,)](
        x, cos, sin, out, x.stride(0), x.stride(1), cos.stride(0), sin.stride(0),
        out.stride(0), out.stride(1), heads, HALF=half, HALF_PAD=triton.next_power_of_2(half),
        HEADS_PAD=triton.next_power_of_2(heads), ROUND=compute != torch.float32, num_warps=4,
    )  # fmt: skip
    return out


@triton.jit
def _silu_and_mul_kernel(x_ptr, out_ptr, stride_x, stride_o, n_cols, BLOCK: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = cols < n_cols
    dt = out_ptr.dtype.element_ty
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0).to(tl.float32)
    up = tl.load(x_ptr + row * stride_x + n_cols + cols, mask=mask, other=0.0).to(tl.float32)
    act = (gate / (1.0 + tl.exp(-gate))).to(dt)  # torch's silu, rounded to the dtype
    tl.store(out_ptr + row * stride_o + cols, (act.to(tl.float32) * up).to(dt), mask=mask)


def silu_and_mul(gate_up: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up for gate_up = [gate | up] along the last dim."""
    shape = gate_up.shape
    x = gate_up.reshape(-1, shape[-1])
    if x.stride(-1) != 1:
        x = x.contiguous()
    n = shape[-1] // 2
    out = torch.empty(x.shape[0], n, dtype=x.dtype, device=x.device)
    block = 1024
    _silu_and_mul_kernel[(x.shape[0], triton.cdiv(n, block))](
        x, out, x.stride(0), out.stride(0), n, BLOCK=block, num_warps=4
    )
    return out.view(*shape[:-1], n)


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, n_rows, n_cols, stride_w,
    HAS_BIAS: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    n_ok = n < n_rows
    rows = w_ptr + n.to(tl.int64)[:, None] * stride_w
    # Products summed per column lane; one cross-lane reduction at the end, not per chunk.
    acc = tl.zeros([BLOCK_N, BLOCK_K], tl.float32)
    for k0 in range(0, n_cols, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + k)
            w = tl.load(rows + k[None, :], mask=n_ok[:, None], other=0.0, eviction_policy="evict_first")
        else:
            x = tl.load(x_ptr + k, mask=k < n_cols, other=0.0)
            w_mask = n_ok[:, None] & (k < n_cols)[None, :]
            w = tl.load(rows + k[None, :], mask=w_mask, other=0.0, eviction_policy="evict_first")
        acc += w.to(tl.float32) * x.to(tl.float32)[None, :]
    y = tl.sum(acc, 1)
    if HAS_BIAS:
        y += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)  # as addmm: one rounding
    tl.store(out_ptr + n, y.to(out_ptr.dtype.element_ty), mask=n_ok)


def gemv_config(n_rows: int, n_cols: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) for a weight of this shape. From a sweep on an H200 with
    cold weights (`python -m epd.bench.roofline --sections gemv`): 8 rows of 1 KB segments per
    program were best or within 2% of it for every Qwen2.5-VL-7B projection but down_proj's
    long rows, where 16 rows and 8 warps were 2% faster."""
    return (16, 512, 8) if n_cols >= 16384 else (8, 512, 4)


def gemv(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int] | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for one row x [1, cols], weight [rows, cols] (rows contiguous).

    Memory-bound: each weight element is read once, in float32 arithmetic (no tensor cores,
    so float32 weights give float32-exact products). For decode at batch 1: on an H200 with
    cold weights cuBLAS read Qwen2.5-VL-7B's qkv / o_proj / gate_up / down at 2.8 / 2.2 /
    3.4 / 3.2 TB/s, this kernel at 3.3 / 2.9 / 4.3 / 3.7 (BENCHMARKS.md, GPU roofline).
    """
    n_rows, n_cols = weight.shape
    if x.shape != (1, n_cols) or weight.stride(1) != 1:
        raise ValueError(f"gemv takes x [1, {n_cols}] and a row-major weight, got {tuple(x.shape)}")
    x = x.contiguous()
    block_n, block_k, warps = config or gemv_config(n_rows, n_cols)
    out = torch.empty(1, n_rows, dtype=torch.result_type(x, weight), device=x.device)
    _gemv_kernel[(triton.cdiv(n_rows, block_n),)](
        x, weight, bias if bias is not None else weight, out, n_rows, n_cols, weight.stride(0),
        HAS_BIAS=bias is not None, EVEN_K=n_cols % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k,
        num_warps=warps,
    )  # fmt: skip
    return out
