"""Packed variable-length attention (the vision tower's) against one SDPA call per segment."""

from __future__ import annotations

import pytest
import torch

from epd.models.config import VisionConfig
from epd.models.layers.attention import varlen_attention
from epd.models.qwen2_vl_vision import vision_window_index

DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")


def per_segment(q, k, v, cu_seqlens):
    """softmax(q k^T / sqrt(d)) v written out, one segment at a time."""
    out = torch.empty_like(q)
    for start, end in zip(cu_seqlens[:-1], cu_seqlens[1:]):
        qs, ks, vs = q[start:end], k[start:end], v[start:end]
        scores = torch.einsum("qhd,khd->hqk", qs, ks) / qs.shape[-1] ** 0.5
        out[start:end] = torch.einsum("hqk,khd->qhd", scores.softmax(-1), vs)
    return out


def window_seqlens(grids) -> list[int]:
    cfg = VisionConfig("qwen2_5_vl", 4, 32, 64, 2, 64, "silu", window_size=112, fullatt_block_indexes=(1, 3))
    return vision_window_index(grids, cfg)[1]


@pytest.mark.parametrize(
    "cu_seqlens",
    [
        [0, 64, 128, 192, 256],  # equal windows: one batched call
        [0, 5, 5, 17, 29, 41, 44, 108],  # empty, equal and odd segments, runs broken and resumed
        window_seqlens([(1, 20, 28), (1, 16, 16)]),  # real window layouts with edge windows
        [0, 300],
    ],
)
def test_varlen_attention_matches_per_segment(cu_seqlens):
    gen = torch.Generator().manual_seed(len(cu_seqlens))
    q, k, v = (torch.randn(cu_seqlens[-1], 3, 16, generator=gen).to(DEVICE) for _ in range(3))
    torch.testing.assert_close(varlen_attention(q, k, v, cu_seqlens), per_segment(q, k, v, cu_seqlens))


def test_window_order_puts_equal_windows_together():
    """A 1280x960 px image (68 x 92 patches) is not a whole number of 112 px windows: its edge
    windows are smaller. Largest first within the frame, its windows form 3 runs of equal length
    (full, edge, corner), so `varlen_attention` makes 3 calls a windowed block, not 18; and the
    order is a permutation of every merge group, each window's groups in raster order."""
    from epd.models.layers.attention import _equal_length_runs

    cfg = VisionConfig("qwen2_5_vl", 4, 32, 64, 2, 64, "silu", window_size=112, fullatt_block_indexes=(1, 3))
    grids = [(1, 68, 92), (2, 16, 20)]
    order, seqlens = vision_window_index(grids, cfg)
    groups = sum(t * h * w for t, h, w in grids) // 4
    assert torch.equal(order.sort().values, torch.arange(groups))
    first_image = [boundary for boundary in seqlens if boundary <= 68 * 92]  # its windows' bounds
    runs = [(length, count) for _, length, count in _equal_length_runs(first_image)]
    assert runs == [(64, 88), (32, 19), (16, 1)]
    assert seqlens[-1] == groups * 4
