"""Rotary position embeddings: the LLM's multimodal RoPE and the vision tower's 2-D RoPE."""

from __future__ import annotations

import torch
from torch import nn

from epd.models.layers import fused


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [tokens, heads, head_dim]; cos/sin: [tokens, head_dim]."""
    if fused.use_fused(x):
        return fused.ops().rotary(x, cos, sin)  # one kernel instead of five
    cos, sin = cos.unsqueeze(-2), sin.unsqueeze(-2)
    return x * cos + rotate_half(x) * sin


class MRotaryEmbedding(nn.Module):
    """Qwen2-VL's multimodal RoPE, and Qwen3-VL's interleaved one.

    Positions are [3, tokens] (temporal, height, width). Each frequency band of the head takes
    its angle from one position row; for text all three rows are equal, which makes this plain
    1-D RoPE. Which row each of the head_dim/2 bands reads (mrope_section = (t, h, w)):

        sectioned (Qwen2-VL):   t t t ... | h h h ... | w w w ...    (t, h, w bands in a run)
        interleaved (Qwen3-VL): t h w t h w ... t h w | t t t ...    (h and w bands at 3i+1,
                                                                      3i+2 while they last)
    """

    def __init__(
        self, head_dim: int, theta: float, mrope_section: tuple[int, int, int], interleaved: bool = False
    ) -> None:
        super().__init__()
        if sum(mrope_section) != head_dim // 2:
            raise ValueError(f"mrope_section {mrope_section} must sum to head_dim/2 = {head_dim // 2}")
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float) / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        rows = mrope_band_rows(mrope_section, interleaved)
        self.register_buffer("band_rows", rows, persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        # Each band's position times its frequency: the products transformers computes for all
        # three rows and then picks from, computed for the picked row only.
        freqs = positions[self.band_rows].t().float() * self.inv_freq  # [tokens, head_dim/2]
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos().to(dtype), emb.sin().to(dtype)


def mrope_band_rows(mrope_section: tuple[int, int, int], interleaved: bool) -> torch.Tensor:
    """The position row (0 = t, 1 = h, 2 = w) each frequency band reads: [sum(mrope_section)]."""
    if not interleaved:
        return torch.cat([torch.full((n,), row) for row, n in enumerate(mrope_section)])
    rows = torch.zeros(sum(mrope_section), dtype=torch.long)
    for row in (1, 2):  # as transformers' Qwen3-VL: h at 1, 4, 7, ..., w at 2, 5, 8, ...
        rows[row : 3 * mrope_section[row] : 3] = row
    return rows


class VisionRotaryEmbedding(nn.Module):
    """2-D RoPE of the vision tower: half the bands follow the patch row, half the column."""

    def __init__(self, head_dim: int, theta: float = 10000.0) -> None:
        super().__init__()
        dim = head_dim // 2
        inv_freq = 1.0 / (theta ** (torch.arange(0, dim, 2, dtype=torch.float) / dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)

    def forward(self, hw_positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """hw_positions: [patches, 2] -> float32 cos, sin of shape [patches, head_dim]."""
        freqs = hw_positions[..., None].float() * self.inv_freq  # [patches, 2, head_dim/4]
        freqs = freqs.flatten(1)
        emb = torch.cat((freqs, freqs), dim=-1)
        return emb.cos(), emb.sin()
