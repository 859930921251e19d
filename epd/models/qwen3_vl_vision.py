"""The Qwen3-VL vision tower: patches in, the merged embedding and its deepstack levels out.

Like Qwen2-VL's tower (same packing, patch order, 2-D RoPE and per-image full attention), plus
a learned position embedding and deepstack: after each block in `deepstack_visual_indexes`,
a merger of its own ("postshuffle": it normalises the 2x2 group, not each patch) turns the
block's output into one more LLM-width embedding per token, which the LLM adds to its hidden
states after its first layers (`qwen3_vl.py`).

The learned position table is a square grid of `num_position_embeddings` entries; an image
of any grid reads it bilinearly resampled (corners aligned), the same taps and weights as
transformers' `get_vision_interpolation_indices_and_weights`.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from epd.models.config import VisionConfig
from epd.models.layers.activation import get_activation
from epd.models.layers.linear import patch_projection
from epd.models.layers.rotary import VisionRotaryEmbedding
from epd.models.qwen2_vl_vision import Grid, VisionAttention, _cumulative, vision_hw_positions


class Qwen3VisionPatchEmbed(nn.Module):
    """The checkpoint's Conv3d (stride = kernel, with a bias): a matmul per patch."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        kernel = (cfg.temporal_patch_size, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, cfg.hidden_size, kernel_size=kernel, stride=kernel, bias=True)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return patch_projection(patches, self.proj.weight.view(self.proj.out_channels, -1), self.proj.bias)


class Qwen3VisionMLP(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.linear_fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.act_fn = get_activation(cfg.hidden_act)
        self.linear_fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class Qwen3VisionBlock(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.norm2 = nn.LayerNorm(cfg.hidden_size, eps=1e-6)
        self.attn = VisionAttention(cfg)
        self.mlp = Qwen3VisionMLP(cfg)

    def forward(
        self, x: torch.Tensor, cu_seqlens: list[int], cos: torch.Tensor, sin: torch.Tensor
    ) -> torch.Tensor:
        # The whole residual stream, not (output, residual): deepstack taps read it after a block.
        x = x + self.attn(self.norm1(x), cu_seqlens, cos, sin)
        return x + self.mlp(self.norm2(x))


class Qwen3PatchMerger(nn.Module):
    """Folds each 2x2 merge group into one LLM-width token. The main merger normalises each
    patch before folding; a deepstack merger (`postshuffle`) normalises the folded group."""

    def __init__(self, cfg: VisionConfig, postshuffle: bool) -> None:
        super().__init__()
        self.group_dim = cfg.hidden_size * cfg.spatial_merge_size**2
        self.postshuffle = postshuffle
        self.norm = nn.LayerNorm(self.group_dim if postshuffle else cfg.hidden_size, eps=1e-6)
        self.linear_fc1 = nn.Linear(self.group_dim, self.group_dim)
        self.act_fn = nn.GELU()
        self.linear_fc2 = nn.Linear(self.group_dim, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = (
            self.norm(x.view(-1, self.group_dim))
            if self.postshuffle
            else self.norm(x).view(-1, self.group_dim)
        )
        return self.linear_fc2(self.act_fn(self.linear_fc1(x)))


class Qwen3VisionTransformer(nn.Module):
    """`forward(patches, grids)` -> [merged tokens, out_hidden * (1 + deepstack levels)]: each
    token's merged embedding, then its deepstack embeddings in block order, images in order."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.patch_embed = Qwen3VisionPatchEmbed(cfg)
        self.pos_embed = nn.Embedding(cfg.num_position_embeddings, cfg.hidden_size)
        self.grid_side = int(cfg.num_position_embeddings**0.5)
        self.rotary_pos_emb = VisionRotaryEmbedding(cfg.head_dim, cfg.rope_theta)
        self.blocks = nn.ModuleList(Qwen3VisionBlock(cfg) for _ in range(cfg.depth))
        self.merger = Qwen3PatchMerger(cfg, postshuffle=False)
        self.deepstack_merger_list = nn.ModuleList(
            Qwen3PatchMerger(cfg, postshuffle=True) for _ in cfg.deepstack_visual_indexes
        )

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        cfg = self.cfg
        seqlens = _cumulative([g[1] * g[2] for g in grids for _ in range(g[0])])  # one per frame
        x = self.patch_embed(patches)
        x = x + self._position_embeddings(grids, x.device).to(x.dtype)
        cos, sin = self.rotary_pos_emb(vision_hw_positions(grids, cfg.spatial_merge_size).to(x.device))
        levels = []
        for i, block in enumerate(self.blocks):
            x = block(x, seqlens, cos, sin)
            if i in cfg.deepstack_visual_indexes:
                merger = self.deepstack_merger_list[cfg.deepstack_visual_indexes.index(i)]
                levels.append(merger(x))
        return torch.cat([self.merger(x), *levels], dim=1)

    def _position_embeddings(self, grids: Sequence[Grid], device: torch.device) -> torch.Tensor:
        """Each patch's learned position, bilinearly resampled from the square table: [patches, hidden]."""
        index, weight = position_embedding_taps(grids, self.grid_side, self.cfg.spatial_merge_size)
        return (self.pos_embed(index.to(device)) * weight.to(device)[:, :, None]).sum(1)


def position_embedding_taps(
    grids: Sequence[Grid], side: int, merge: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Table rows and weights of the 4 bilinear taps of every patch, in the processor's patch
    order: ([patches, 4] long, [patches, 4] float32). A grid of h x w patches maps its corners
    onto the table's corners (`align_corners=True`), whatever its aspect ratio."""
    rows, weights = [], []
    for grid in grids:
        hw = vision_hw_positions([grid], merge)
        h_taps, h_weights = _axis_taps(hw[:, 0], grid[1], side)
        w_taps, w_weights = _axis_taps(hw[:, 1], grid[2], side)
        rows.append((h_taps[:, :, None] * side + w_taps[:, None, :]).flatten(1))
        weights.append((h_weights[:, :, None] * w_weights[:, None, :]).flatten(1))
    return torch.cat(rows), torch.cat(weights)


def _axis_taps(index: torch.Tensor, size: int, side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The two table entries either side of each of `index` (positions on an axis of `size`
    patches), and their linear weights; float32 arithmetic in transformers' order."""
    src = index.float() * (side - 1) / max(size - 1, 1)
    floor = torch.floor(src)
    offsets = torch.arange(2)
    taps = (floor.long()[:, None] + offsets).clamp(0, side - 1)
    distance = (src[:, None] - floor[:, None] - offsets).abs()
    return taps, (1 - distance).clamp(min=0)
