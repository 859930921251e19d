"""InternVL's vision side: InternViT over square tiles, the pixel shuffle, the MLP projector.

    patches [tiles * n, C*P*P] -> per tile: [CLS | n patch embeddings] + learned positions
        -> InternViT blocks (full attention inside each tile)
        -> drop CLS -> pixel shuffle (each m x m group of patches -> one m*m*C feature)
        -> projector (LayerNorm, Linear, act, Linear) -> [tiles * n / m**2, LLM hidden]

Every tile has the size the position table was trained for (`image_size`, 448 px), so the
table is used as is, never resampled, and all tiles of all images attend as one batch.
Patches arrive tile after tile, row-major inside a tile (epd.inputs.internvl_tiles); each
image's grid is a strip of its tokens, so only its patch count matters here.

Module and parameter names are transformers' (`InternVLVisionModel`, `multi_modal_projector`)
except q/k/v, fused into `qkv_proj`. Block arithmetic follows transformers' order:

    x = x + lambda_1 * attention(norm_before(x));   x = x + lambda_2 * mlp(norm_after(x))
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from epd.models.config import InternVisionOptions, VisionConfig
from epd.models.layers.activation import get_activation
from epd.models.layers.linear import MergedLinear, patch_projection
from epd.models.layers.norm import RMSNorm
from epd.models.qwen2_vl_vision import Qwen2VisionMLP

Grid = tuple[int, int, int]


def _norm(options: InternVisionOptions, size: int) -> nn.Module:
    if options.norm_type == "rms_norm":
        return RMSNorm(size, options.layer_norm_eps)
    return nn.LayerNorm(size, eps=options.layer_norm_eps)


class InternVisionPatchEmbeddings(nn.Module):
    """The checkpoint's Conv2d (stride = kernel, with a bias): a matmul per flattened patch."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        p = cfg.patch_size
        self.projection = nn.Conv2d(cfg.in_channels, cfg.hidden_size, kernel_size=p, stride=p)

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        weight = self.projection.weight.view(self.projection.out_channels, -1)
        return patch_projection(patches, weight, self.projection.bias)


class InternVisionEmbeddings(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.patches_per_tile = (cfg.internvl.image_size // cfg.patch_size) ** 2
        self.cls_token = nn.Parameter(torch.zeros(1, 1, cfg.hidden_size))
        self.patch_embeddings = InternVisionPatchEmbeddings(cfg)
        self.position_embeddings = nn.Parameter(torch.zeros(1, self.patches_per_tile + 1, cfg.hidden_size))

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        """[tiles * n, C*P*P] -> [tiles, 1 + n, hidden]."""
        x = self.patch_embeddings(patches).view(-1, self.patches_per_tile, self.cls_token.shape[-1])
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self.position_embeddings


class InternVisionAttention(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        h, options = cfg.hidden_size, cfg.internvl
        self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
        self.qkv_proj = MergedLinear(h, [("q", h), ("k", h), ("v", h)], bias=options.attention_bias)
        self.projection_layer = nn.Linear(h, h)
        self.q_norm = self.k_norm = None
        if options.qk_norm:  # InternViT-6B: over all heads at once, before they are split
            self.q_norm, self.k_norm = RMSNorm(h), RMSNorm(h)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: [tiles, L, hidden], attention inside each tile."""
        q, k, v = self.qkv_proj(x).chunk(3, dim=-1)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k, v = (t.unflatten(-1, (self.num_heads, self.head_dim)).transpose(1, 2) for t in (q, k, v))
        out = F.scaled_dot_product_attention(q, k, v, scale=self.head_dim**-0.5)
        return self.projection_layer(out.transpose(1, 2).flatten(2))


class InternVisionLayer(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.attention = InternVisionAttention(cfg)
        self.mlp = Qwen2VisionMLP(cfg)  # the same fc1, act, fc2 (and checkpoint names)
        self.layernorm_before = _norm(cfg.internvl, cfg.hidden_size)
        self.layernorm_after = _norm(cfg.internvl, cfg.hidden_size)
        # Layer scale: learned per-channel gains on each branch.
        self.lambda_1 = nn.Parameter(torch.ones(cfg.hidden_size))
        self.lambda_2 = nn.Parameter(torch.ones(cfg.hidden_size))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.lambda_1 * self.attention(self.layernorm_before(x)) + x
        return self.lambda_2 * self.mlp(self.layernorm_after(x)) + x


class InternVisionEncoder(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.layer = nn.ModuleList(InternVisionLayer(cfg) for _ in range(cfg.depth))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layer:
            x = layer(x)
        return x


class InternVisionModel(nn.Module):
    """InternViT: patches of whole tiles -> [tiles, 1 + n, hidden] (CLS first)."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        self.embeddings = InternVisionEmbeddings(cfg)
        self.encoder = InternVisionEncoder(cfg)
        self.layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.internvl.layer_norm_eps)
        if not cfg.internvl.final_norm:
            self.layernorm = nn.Identity()  # `use_mean_pooling`: the last block's output as is

    def forward(self, patches: torch.Tensor) -> torch.Tensor:
        return self.layernorm(self.encoder(self.embeddings(patches)))


class InternVLMultiModalProjector(nn.Module):
    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        width = cfg.hidden_size * cfg.spatial_merge_size**2
        self.layer_norm = nn.LayerNorm(width)  # transformers' default eps (1e-5), not the tower's
        self.linear_1 = nn.Linear(width, cfg.out_hidden_size)
        self.act = get_activation(cfg.internvl.projector_hidden_act)
        self.linear_2 = nn.Linear(cfg.out_hidden_size, cfg.out_hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(self.layer_norm(x))))


class InternVLVisual(nn.Module):
    """All an encoder instance holds: `forward(patches, grids)` -> [tokens of all images, LLM hidden],
    images in order, each image's tokens tile by tile."""

    def __init__(self, cfg: VisionConfig) -> None:
        super().__init__()
        if cfg.internvl is None:
            raise ValueError("InternVLVisual needs an InternVL vision config")
        self.cfg = cfg
        self.vision_tower = InternVisionModel(cfg)
        self.multi_modal_projector = InternVLMultiModalProjector(cfg)

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        self._check_whole_tiles(patches, grids)
        features = self.vision_tower(patches)[:, 1:]  # the CLS token feeds nothing
        side = self.cfg.internvl.image_size // self.cfg.patch_size
        shuffled = pixel_shuffle(features.unflatten(1, (side, side)), self.cfg.spatial_merge_size)
        return self.multi_modal_projector(shuffled.flatten(0, 2))

    def _check_whole_tiles(self, patches: torch.Tensor, grids: Sequence[Grid]) -> None:
        per_tile = self.vision_tower.embeddings.patches_per_tile
        counts = [t * h * w for t, h, w in grids]
        if sum(counts) != patches.shape[0] or any(n % per_tile for n in counts):
            raise ValueError(
                f"InternVL encodes whole tiles of {per_tile} patches; got {patches.shape[0]} patches "
                f"for images of {counts}"
            )


def pixel_shuffle(x: torch.Tensor, merge: int) -> torch.Tensor:
    """[tiles, side, side, C] -> [tiles, side/m, side/m, C*m*m]: transformers' `pixel_shuffle`
    (scale 1/m), the same views and permutes, so the features of each group land in its order."""
    tiles, rows, cols, channels = x.shape
    x = x.reshape(tiles, rows, cols // merge, channels * merge).permute(0, 2, 1, 3)
    x = x.reshape(tiles, cols // merge, rows // merge, channels * merge * merge)
    return x.permute(0, 2, 1, 3)
