"""Decode projections at batch 2..128: cuBLAS against a Triton GEMM that streams the weight.

    python -m epd.bench.skinny_gemm [--config-dir DIR] [--batches 16,64] [--out results.json]

Qwen2.5-VL-7B's projection shapes (qkv, o_proj, gate_up, down), x [batch, cols] in bf16, weights
cold as in a real step (each call reads the next of enough copies to fill 2 GiB), calls replayed
from a CUDA graph. Prints, per shape and batch, cuBLAS and the best Triton configs (µs, TB/s of
weight reads, share of the measured copy rate) and the largest error against a float32 product.

The kernel gives each program a [BLOCK_N, K / SPLIT_K] slab of the weight and all M rows of x
(small: it stays in L2), so the grid is as wide as the weight needs; with SPLIT_K > 1 the
programs write float32 partial sums that one reduction adds. It lives here, not in the model: on
an H200 at batch 64 its best configs came within 4% of cuBLAS on gate_up and down_proj and were
slower on qkv and o_proj (BENCHMARKS.md), so the decoder keeps cuBLAS above batch 1.
"""

from __future__ import annotations

import argparse
import itertools
import json
from pathlib import Path

import torch
import triton
import triton.language as tl
from torch.nn import functional as F

from epd.bench import roofline_setup as rs
from epd.bench.roofline_gemv import POOL_BYTES, projection_shapes
from epd.models.config import VLModelConfig

SHAPES = ("qkv", "o_proj", "gate_up", "down")
BLOCK_N, BLOCK_K, SPLIT_K, WARPS, STAGES = (32, 64, 128), (64, 128, 256), (1, 2, 4, 8), (4, 8), (3, 4)


@triton.jit
def _skinny_kernel(
    x_ptr, w_ptr, b_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om, stride_os,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr, EVEN_K: tl.constexpr,
):  # fmt: skip
    pid_n = tl.program_id(0)
    pid_k = tl.program_id(1)
    m = tl.arange(0, BLOCK_M)
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_ok, n_ok = m < M, n < N
    k_per_split = tl.cdiv(K, SPLIT_K * BLOCK_K) * BLOCK_K
    k_start = pid_k * k_per_split
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for k0 in range(k_start, k_start + k_per_split, BLOCK_K):
        k = k0 + tl.arange(0, BLOCK_K)
        if EVEN_K:
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None], other=0.0)
            w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None], other=0.0,
                        eviction_policy="evict_first")  # fmt: skip
        else:
            k_ok = k < K
            x = tl.load(x_ptr + m[:, None] * stride_xm + k[None, :], mask=m_ok[:, None] & k_ok[None, :],
                        other=0.0)  # fmt: skip
            w = tl.load(w_ptr + n[:, None] * stride_wn + k[None, :], mask=n_ok[:, None] & k_ok[None, :],
                        other=0.0, eviction_policy="evict_first")  # fmt: skip
        acc = tl.dot(x, tl.trans(w), acc)
    if HAS_BIAS:  # only without a split: the reduction adds it otherwise
        acc += tl.load(b_ptr + n, mask=n_ok, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * stride_os + m[:, None] * stride_om + n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_ok[:, None] & n_ok[None, :])


def skinny_config(m: int, n: int, k: int) -> tuple[int, int, int, int, int]:
    """(BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) for x [m, k] @ W [n, k].T."""
    tiles = triton.cdiv(n, 64)
    split = 1 if tiles >= 264 else (2 if tiles >= 128 else 4)
    return 64, 128, split, 4, 4


def block_m(m: int) -> int:
    return max(16, triton.next_power_of_2(m))


def skinny_linear(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    config: tuple[int, int, int, int, int] | None = None,
) -> torch.Tensor:
    """F.linear(x, weight, bias) for x [M, K] with M <= 128, weight [N, K] row-major."""
    m, k = x.shape
    n = weight.shape[0]
    if weight.shape[1] != k or weight.stride(1) != 1 or m > 128:
        raise ValueError(f"skinny_linear takes x [<=128, {weight.shape[1]}], got {tuple(x.shape)}")
    x = x.contiguous()
    block_n, block_k, split, warps, stages = config or skinny_config(m, n, k)
    dtype = torch.result_type(x, weight)
    out = torch.empty(split, m, n, dtype=torch.float32 if split > 1 else dtype, device=x.device)
    grid = (triton.cdiv(n, block_n), split)
    fuse_bias = bias is not None and split == 1
    _skinny_kernel[grid](
        x, weight, bias if fuse_bias else weight, out, m, n, k, x.stride(0), weight.stride(0),
        out.stride(1), out.stride(0), HAS_BIAS=fuse_bias, BLOCK_M=block_m(m), BLOCK_N=block_n,
        BLOCK_K=block_k, SPLIT_K=split, EVEN_K=k % (split * block_k) == 0, num_warps=warps,
        num_stages=stages,
    )  # fmt: skip
    if split == 1:
        return out[0]
    y = out.sum(0)
    if bias is not None:
        y += bias.float()
    return y.to(dtype)


def copy_rate(device: torch.device) -> float:
    src = torch.randn(1 << 30, device=device, dtype=torch.bfloat16)
    dst = torch.empty_like(src)
    seconds = rs.device_time(lambda: dst.copy_(src), 3, 10)
    return 2 * src.numel() * 2 / seconds


def configs() -> list[tuple[int, int, int, int, int]]:
    return list(itertools.product(BLOCK_N, BLOCK_K, SPLIT_K, WARPS, STAGES))


def bench_shape(name: str, rows: int, cols: int, bias: bool, batch: int, bw: float, device) -> list[dict]:
    copies = max(2, POOL_BYTES // (rows * cols * 2))
    weights = torch.randn(copies, rows, cols, device=device, dtype=torch.bfloat16) * 0.02
    b = torch.randn(rows, device=device, dtype=torch.bfloat16) if bias else None
    x = torch.randn(batch, cols, device=device, dtype=torch.bfloat16)
    want = F.linear(x.float(), weights[0].float(), None if b is None else b.float())
    read = rows * cols * 2
    rows_out = []

    def measure(tag: str, fn) -> None:
        try:
            err = (fn(weights[0]).float() - want).abs().max().item()
            sec = rs.graph_time(lambda: [fn(w) for w in weights], calls=1) / copies
        except Exception as exc:  # a config Triton cannot build for this shape (shared memory)
            print(f"  {name} b{batch} {tag}: {type(exc).__name__}")
            return
        rows_out.append(dict(shape=f"{name} {rows}x{cols}", batch=batch, variant=tag, us=sec * 1e6,
                             TBps=read / sec / 1e12, of_copy=read / sec / bw, max_err=err))  # fmt: skip

    measure("cublas", lambda w: F.linear(x, w, b))
    measure("triton default", lambda w: skinny_linear(x, w, b))
    for config in configs():
        tag = "triton " + "x".join(map(str, config))
        measure(tag, lambda w, c=config: skinny_linear(x, w, b, c))
    return rows_out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config-dir", default="/work/shared/model-configs")
    p.add_argument("--config", default="qwen2_5_vl_7b.json")
    p.add_argument("--batches", default="16,64")
    p.add_argument("--shapes", default=",".join(SHAPES))
    p.add_argument("--out", default=None)
    args = p.parse_args()
    device = torch.device("cuda")
    raw = json.loads((Path(args.config_dir) / args.config).read_text())
    text = VLModelConfig.from_dict(raw).text
    bw = copy_rate(device)
    print(f"copy rate {bw / 1e12:.3f} TB/s on {torch.cuda.get_device_name()}")
    shapes = projection_shapes(text)
    results = []
    for batch in (int(b) for b in args.batches.split(",")):
        for name in args.shapes.split(","):
            rows, cols, bias = shapes[name]
            found = bench_shape(name, rows, cols, bias, batch, bw, device)
            results += found
            torch.cuda.empty_cache()
            found.sort(key=lambda r: r["us"])
            cublas = next(r for r in found if r["variant"] == "cublas")
            default = next((r for r in found if r["variant"] == "triton default"), None)
            line = f"{name} {rows}x{cols} b{batch}: cublas {cublas['us']:.1f} us ({cublas['of_copy']:.2f})"
            if default:
                line += f", default {default['us']:.1f} us ({default['of_copy']:.2f})"
            print(line)
            for r in found[:5]:
                print(f"    {r['variant']:<28} {r['us']:8.1f} us  {r['TBps']:.2f} TB/s  {r['of_copy']:.2f}"
                      f"  err {r['max_err']:.2e}")  # fmt: skip
    if args.out:
        Path(args.out).write_text(json.dumps({"copy_Bps": bw, "results": results}, indent=1))


if __name__ == "__main__":
    main()
