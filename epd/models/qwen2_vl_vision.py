"""The Qwen2-VL / Qwen2.5-VL vision tower: patches in, LLM-width image embeddings out.

Images of different sizes are packed into one sequence of patches; attention never
crosses an image boundary (and, in Qwen2.5-VL's windowed blocks, never crosses a window
boundary). No image is padded to another's size.

Patch order: the image processor emits patches so that each 2x2 merge group is
contiguous, which lets the merger fold groups with a plain reshape.

Each block's projections come from epd.parallel.vision's factories: the plain layers, unless
the tower is built split over tensor-parallel ranks (`building_rank(group, split_vision=True)`),
when a block holds its rank's heads and MLP columns and its two row-parallel layers sum over
the ranks themselves.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from epd.models.config import VisionConfig
from epd.models.layers import fused
from epd.models.layers.activation import SiluAndMul, get_activation
from epd.models.layers.attention import varlen_attention
from epd.models.layers.linear import patch_projection
from epd.models.layers.norm import RMSNorm
from epd.models.layers.rotary import VisionRotaryEmbedding, apply_rotary
from epd.parallel.linear import ColumnShard
from epd.parallel.vision import (
    vision_column_linear,
    vision_heads,
    vision_merged_column_linear,
    vision_row_linear,
)

Grid = tuple[int, int, int]


class PatchEmbed(nn.Module):
    """The checkpoint's Conv3d whose stride equals its kernel: exactly a matmul per patch."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=False)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return patch_projection(patches, self.proj.weight.view(self.proj.out_channels, -1))


class VisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.num_heads = vision_heads(cfg.num_heads)  # this rank's: all of them unless split
        self.qkv = vision_column_linear(cfg.hidden_size, 3 * cfg.hidden_size, parts=3)
        self.proj = vision_row_linear(cfg.hidden_size, cfg.hidden_size)

    def forward(
        self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        n = x.shape[0]
        qkv = self.qkv(x).view(n, 3 * self.num_heads, -1)
        q, k = self._rotate(qkv, cos, sin)
        out = varlen_attention(q, k, qkv[:, 2 * self.num_heads :], cu_seqlens)
        return self.proj(out.view(n, -1))

    def _rotate(
        self, qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """q and k rotated in float32 as the reference does, whatever the model dtype, back in
        the model dtype. The fused kernel does both in one launch without float32 copies (on a
        1344 px image those copies moved ~3 GB a block)."""
        h = self.num_heads
        if fused.use_fused(qkv):
            qk = fused.ops().rotary(qkv[:, : 2 * h], cos, sin, out_dtype=qkv.dtype)
            return qk[:, :h], qk[:, h:]
        q, k = qkv[:, :h], qkv[:, h : 2 * h]
        return apply_rotary(q.float(), cos, sin).to(q.dtype), apply_rotary(k.float(), cos, sin).to(k.dtype)


class Qwen2VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.fc1 = vision_column_linear(cfg.hidden_size, cfg.intermediate_size)
        self.act = get_activation(cfg.hidden_act)
        self.fc2 = vision_row_linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Qwen25VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.hidden_act != "silu":
            raise ValueError(f"Qwen2.5-VL vision MLP supports silu, got {cfg.hidden_act!r}")
        size = cfg.intermediate_size
        self.gate_up_proj = vision_merged_column_linear(
            cfg.hidden_size, [ColumnShard(0, size), ColumnShard(1, size)], bias=True
        )
        self.act = SiluAndMul()
        self.down_proj = vision_row_linear(size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_up_proj(x)))


class VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.variant == "qwen2_vl":
            self.norm1: nn.Module = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
            self.norm2: nn.Module = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
            self.mlp: nn.Module = Qwen2VisionMLP(cfg)
        else:
            self.norm1 = RMSNorm(cfg.hidden_size, eps=1e-6)
            self.norm2 = RMSNorm(cfg.hidden_size, eps=1e-6)
            self.mlp = Qwen25VisionMLP(cfg)
        self.attn = VisionAttention(cfg)

    def forward(
        self,
        x: torch.Tensor,
        residual: torch.Tensor | None,
        cu_seqlens: list[int],
        cos: torch.Tensor,
        sin: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(previous block's MLP output, residual stream before it) -> the same for this block
        (the first block gets (patch embeddings, None)). As in the LLM's decoder layers, each
        residual add happens inside the norm that follows it."""
        x, residual = add_norm(x, residual, self.norm1)
        x = self.attn(x, cu_seqlens, cos, sin)
        x, residual = add_norm(x, residual, self.norm2)
        return self.mlp(x), residual


def add_norm(
    x: torch.Tensor, residual: torch.Tensor | None, norm: nn.Module
) -> tuple[torch.Tensor, torch.Tensor]:
    """(norm(residual + x), residual + x), or (norm(x), x) without a residual. RMSNorm does
    the add in its kernel on the GPU (`fused.add_rms_norm`); LayerNorm adds first."""
    if residual is None:
        return norm(x), x
    if isinstance(norm, RMSNorm):
        return fused.add_rms_norm(x, residual, norm)
    total = residual + x
    return norm(total), total


class PatchMerger(nn.Module):
    """Folds each merge group (2x2 patches) into one token of the LLM's width."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.group_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        norm = nn.LayerNorm if cfg.variant == "qwen2_vl" else RMSNorm
        self.ln_q = norm(cfg.hidden_size, eps=1e-6)
        self.mlp = nn.Sequential(
            nn.Linear(self.group_dim, self.group_dim),
            nn.GELU(),
            nn.Linear(self.group_dim, cfg.out_hidden_size),
        )

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """Merged tokens of `residual + x` (the last block's output and residual stream)."""
        return self.mlp(add_norm(x, residual, self.ln_q)[0].view(-1, self.group_dim))


@dataclass(frozen=True)
class TowerPlan:
    """What the tower's forward derives from the grids alone, made before any device work so that
    the work itself (`VisionTransformer.run`) holds no host-to-device copy and can be captured
    as a CUDA graph (epd.models.vision_graphs)."""

    image_seqlens: list[int]  # frame boundaries, in patches (full-attention blocks)
    window_seqlens: list[int]  # window boundaries in the window order (the image's, qwen2_vl)
    hw_positions: torch.Tensor  # [patches, 2] on the device: each patch's row and column
    window_index: torch.Tensor | None  # merge groups in window order (qwen2_5_vl), on the device
    restore: torch.Tensor | None  # its inverse: merged rows back to image order


class VisionTransformer(nn.Module):
    """`forward(patches, grids)` -> one embedding row per merged patch group, images in order."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = PatchEmbed(cfg)
        self.rotary_pos_emb = VisionRotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = PatchMerger(cfg)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        return self.run(patches, self.plan(grids, patches.device))

    def plan(self, grids: Sequence[Grid], device: torch.device) -> TowerPlan:
        cfg = self.cfg
        image_seqlens = _cumulative([t_h_w for g in grids for t_h_w in [g[1] * g[2]] * g[0]])
        positions = vision_hw_positions(grids, cfg.spatial_merge_size).to(device)
        if cfg.variant != "qwen2_5_vl":
            return TowerPlan(image_seqlens, image_seqlens, positions, None, None)
        window_index, window_seqlens = vision_window_index(grids, cfg)
        window_index = window_index.to(device)
        return TowerPlan(image_seqlens, window_seqlens, positions, window_index, torch.argsort(window_index))

    def run(self, patches: torch.Tensor, plan: TowerPlan) -> torch.Tensor:
        """The device work of `forward`, on a plan of the same grids."""
        cfg = self.cfg
        merge_unit = cfg.spatial_merge_size**2
        x = self.patch_embed(patches)
        cos, sin = self.rotary_pos_emb(plan.hw_positions)
        if plan.window_index is not None:
            x, cos, sin = (_permute_groups(t, plan.window_index, merge_unit) for t in (x, cos, sin))
        residual = None
        for i, block in enumerate(self.blocks):
            full = cfg.variant == "qwen2_vl" or i in cfg.fullatt_block_indexes
            x, residual = block(x, residual, plan.image_seqlens if full else plan.window_seqlens, cos, sin)
        merged = self.merger(x, residual)
        return merged if plan.restore is None else merged[plan.restore]


def vision_hw_positions(grids: Sequence[Grid], merge: int) -> torch.Tensor:
    """(row, column) of every patch, in the processor's merge-group-major order: [patches, 2]."""
    out = []
    for t, h, w in grids:
        rows = torch.arange(h).view(h // merge, merge, 1, 1).expand(-1, -1, w // merge, merge)
        cols = torch.arange(w).view(1, 1, w // merge, merge).expand(h // merge, merge, -1, -1)
        hw = torch.stack([rows.transpose(1, 2).flatten(), cols.transpose(1, 2).flatten()], dim=-1)
        out.append(hw.repeat(t, 1))
    return torch.cat(out)


def vision_window_index(grids: Sequence[Grid], cfg: VisionConfig) -> tuple[torch.Tensor, list[int]]:
    """Qwen2.5-VL windows: reorder merge groups so each window is contiguous.

    Returns the new order of merge groups and the window boundaries in patches.
    Windows are `window_size` pixels square, cut from the top-left; edge windows are smaller.
    Within each frame the windows go largest first (a stable sort): a frame whose side is not a
    whole number of windows (1280x960 px) alternates full and edge windows row by row, and
    `varlen_attention` makes one call per run of equal lengths, so in raster order such an image
    cost 18 attention calls a windowed block, sorted 3 to 4. Each window attends within itself and
    the merger's output is put back in image order, so the order changes no result.
    """
    side = cfg.window_size // cfg.spatial_merge_size // cfg.patch_size  # window side in merge groups
    merge_unit = cfg.spatial_merge_size**2
    order, seqlens, base = [], [], 0
    for t, h, w in grids:
        gh, gw = h // cfg.spatial_merge_size, w // cfg.spatial_merge_size
        index = torch.arange(t * gh * gw).view(t, gh, gw)
        for frame in range(t):
            windows = [
                index[frame, r : r + side, c : c + side].flatten() + base
                for r in range(0, gh, side)
                for c in range(0, gw, side)
            ]
            windows.sort(key=lambda window: -window.numel())
            order += windows
            seqlens += [window.numel() * merge_unit for window in windows]
        base += t * gh * gw
    return torch.cat(order), _cumulative(seqlens)


def _permute_groups(x: torch.Tensor, group_order: torch.Tensor, merge_unit: int) -> torch.Tensor:
    n = x.shape[0]
    return x.view(n // merge_unit, merge_unit, -1)[group_order].view(n, -1)


def _cumulative(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for length in lengths:
        out.append(out[-1] + length)
    return out
