"""Single-row projections (a decode step at batch 1): cuBLAS against the Triton GEMV.

Each case reads one projection's weight shape with x [1, cols], as the decoder layers do at
batch 1. The weights are cold, as in a real step (a layer's weights are long evicted from L2
when it runs again): every call reads the next of enough copies to fill 2 GiB, and the calls
are replayed from a CUDA graph so that launch overhead stays out. GB/s counts the weight bytes.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.nn import functional as F

from epd.bench import roofline_setup as rs
from epd.models.config import TextConfig

# (BLOCK_N, BLOCK_K, num_warps) of the Triton GEMV to try, besides its default for the shape.
CONFIGS = ((4, 1024, 4), (8, 512, 4), (8, 1024, 4), (16, 256, 4), (16, 512, 4), (16, 512, 8),
           (32, 256, 8), (32, 512, 8))  # fmt: skip
POOL_BYTES = 2 << 30


def projection_shapes(cfg: TextConfig) -> dict[str, tuple[int, int, bool]]:
    """name -> (rows, cols, bias) of every weight a decode step multiplies."""
    h, d = cfg.hidden_size, cfg.head_dim
    qkv = (cfg.num_attention_heads + 2 * cfg.num_key_value_heads) * d
    return {
        "qkv": (qkv, h, True),
        "o_proj": (h, cfg.num_attention_heads * d, False),
        "gate_up": (2 * cfg.intermediate_size, h, False),
        "down": (h, cfg.intermediate_size, False),
        "lm_head": (cfg.vocab_size, h, False),
    }


def bench_gemv(cfg: TextConfig, record: Callable[..., None], bw: float, device: torch.device) -> None:
    for name, (rows, cols, bias) in projection_shapes(cfg).items():
        _case(name, rows, cols, bias, record, bw, device)


def _case(name: str, rows: int, cols: int, bias: bool, record, bw: float, device: torch.device) -> None:
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    copies = max(2, POOL_BYTES // (rows * cols * 2))
    weights = torch.randn(copies, rows, cols, device=device, dtype=dtype) * 0.02
    b = torch.randn(rows, device=device, dtype=dtype) if bias else None
    x = torch.randn(1, cols, device=device, dtype=dtype)
    read = rows * cols * weights.element_size()
    variants: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {"cublas": lambda w: F.linear(x, w, b)}
    if device.type == "cuda":
        from epd.models.layers import triton_ops

        default = triton_ops.gemv_config(rows, cols)
        for config in dict.fromkeys((default, *CONFIGS)):
            tag = "triton " + "x".join(map(str, config)) + (" (default)" if config == default else "")
            variants[tag] = lambda w, c=config: triton_ops.gemv(x, w, b, c)
    for tag, fn in variants.items():
        sec = rs.graph_time(lambda fn=fn: [fn(w) for w in weights], calls=1) / copies
        record("gemv", f"{name} {rows}x{cols} {tag}", us=sec * 1e6, GBps=read / sec / 1e9,
               of_copy_bw=read / sec / bw)  # fmt: skip
