"""The attention layer the LLM calls (the backend and KV cache slice are bound by the runner),
and packed variable-length attention for the vision tower."""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from epd.attention.backend import AttentionBackend, TorchSDPABackend
from epd.attention.context import get_forward_context


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.backend: AttentionBackend = TorchSDPABackend()
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, kv_heads, head_dim]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound: the model runner binds it before the first forward")
        meta = get_forward_context().metadata
        return self.backend.forward(q, k, v, self.kv_cache, meta, self.scale)


def varlen_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: list[int]
) -> torch.Tensor:
    """Bidirectional attention inside each segment [cu_seqlens[i], cu_seqlens[i+1]) of packed
    rows (images, or windows of images, in the vision tower); [tokens, heads, dim] in and out.

    One SDPA call per run of consecutive equal-length segments, as a batch, instead of one
    per segment: a 1344 px image has 144 windows, and a launch each (times 28 blocks) costs
    more than their arithmetic. Same result as attending segment by segment.
    """
    runs = _equal_length_runs(cu_seqlens)
    if len(runs) == 1 and runs[0][1] * runs[0][2] == q.shape[0]:
        return _attend_equal_segments(q, k, v, runs[0][1])  # one call covers every row: no copy
    out = torch.empty_like(q)
    for start, length, count in runs:
        rows = slice(start, start + length * count)
        out[rows] = _attend_equal_segments(q[rows], k[rows], v[rows], length)
    return out


def _attend_equal_segments(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, length: int) -> torch.Tensor:
    """Rows cut into consecutive segments of `length`, each attending within itself, as one batch."""
    qs, ks, vs = (t.view(t.shape[0] // length, length, *t.shape[1:]).transpose(1, 2) for t in (q, k, v))
    return F.scaled_dot_product_attention(qs, ks, vs).transpose(1, 2).reshape(q.shape)


def _equal_length_runs(cu_seqlens: list[int]) -> list[tuple[int, int, int]]:
    """(first row, segment length, number of segments) of each run of equal-length segments."""
    runs: list[tuple[int, int, int]] = []
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        length = end - start
        if length == 0:
            continue
        if runs and runs[-1][1] == length and runs[-1][0] + runs[-1][1] * runs[-1][2] == start:
            runs[-1] = (runs[-1][0], length, runs[-1][2] + 1)
        else:
            runs.append((start, length, 1))
    return runs
