"""The Qwen2-VL / Qwen2.5-VL vision tower split over the ranks (Megatron on the ViT): what an E
stage of degree n would use to cut the latency of one large image, where the replicated tower
(the default) encodes n images side by side instead.

| tower weight (per block)              | split        | dim | how                                     |
|---------------------------------------|--------------|-----|-----------------------------------------|
| attn.qkv .weight/.bias                | heads        | 0   | one fused [q; k; v] tensor: each third  |
|                                       |              |     | cut by heads, this rank's rows of each  |
| attn.proj.weight                      | its input    | 1   | row-parallel: partial sums              |
| mlp.fc1 .weight/.bias (Qwen2-VL)      | its output   | 0   | column-parallel                         |
| mlp.gate_proj, up_proj (Qwen2.5-VL)   | its output   | 0   | merged column-parallel, with bias       |
| mlp.fc2, down_proj .weight            | its input    | 1   | row-parallel: partial sums              |
| attn.proj, fc2, down_proj .bias       | replicated   |     | added once, after the sum               |
| patch_embed, norms, rotary, merger    | replicated   |     |                                         |

Two all-reduces a block, each of the whole [patches, hidden]: after attn.proj and after the MLP's
down projection. The row-parallel layer here runs its own (`forward`: partial product, sum, bias),
unlike the decoder's (whose all-reduce its caller runs: epd.parallel.linear): the tower never
routes its matmuls through `fused.linear`, and a layer that sums for itself stays correct in a
tower that takes only some of these layers (Qwen3-VL's blocks take this attention, InternVL's
layers this MLP; only the Qwen2-VL / Qwen2.5-VL towers, split whole, are tested).

Asked for with `building_rank(group, split_vision=True)` (`build_rank_model(..., split_vision=True)`):
the factories below read `building_vision_group()`; without it (the default, a tensor-parallel
LLM build included) they return exactly the single-device layers, so the tower is whole on
every rank. Weights load from the whole checkpoint tensors (each parameter's `weight_loader`
keeps its rank's share); dummy weights at any degree are slices of the single-device ones
(`full_shape`, `load_full`: epd.models.loader.init_dummy_weights). Every rank must encode the
same batch at the same time (the all-reduces pair up): the engine's EPD ranks, which encode on
rank 0 alone, keep the replicated tower.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial

import torch
from torch import nn
from torch.nn import functional as F

from epd.models.layers.linear import MergedLinear, default_weight_loader
from epd.parallel.context import building_vision_group
from epd.parallel.group import TensorParallelGroup
from epd.parallel.linear import ColumnShard, MergedColumnParallelLinear, RowParallelLinear
from epd.parallel.sharding import HeadSplit, Split


def vision_heads(num_heads: int) -> int:
    """The tower's attention heads on the rank being built (all of them unless split)."""
    group = building_vision_group()
    return num_heads if group is None else HeadSplit(num_heads, num_heads, group.world_size).num_heads


def vision_column_linear(in_features: int, out_features: int, *, parts: int = 1) -> nn.Linear:
    """A linear layer with bias whose output is `parts` stacked projections (the fused qkv: 3),
    each cut by rank when the tower is split."""
    group = building_vision_group()
    if group is None:
        return nn.Linear(in_features, out_features)
    return ColumnParallelLinear(in_features, out_features, group, parts)


def vision_merged_column_linear(in_features: int, shards: Sequence[ColumnShard], bias: bool) -> MergedLinear:
    """Several checkpoint tensors in one matmul (gate/up); each cut by rank when split."""
    group = building_vision_group()
    if group is None:
        return MergedLinear(in_features, [(s.name, s.full_size) for s in shards], bias=bias)
    return MergedColumnParallelLinear(in_features, shards, bias, group)


def vision_row_linear(in_features: int, out_features: int) -> nn.Linear:
    """A linear layer with bias back to the tower's width; split, it sums over the ranks itself."""
    group = building_vision_group()
    if group is None:
        return nn.Linear(in_features, out_features)
    return ReducingRowParallelLinear(in_features, out_features, group)


class ColumnParallelLinear(nn.Linear):
    """This rank's rows of each of `parts` equal projections stacked in one checkpoint tensor,
    bias included; the output stays split (this rank's heads, or MLP columns)."""

    def __init__(self, in_features: int, out_features: int, group: TensorParallelGroup, parts: int) -> None:
        if out_features % (parts * group.world_size):
            raise ValueError(
                f"{parts} x {out_features // parts} rows cannot be split over {group.world_size} ranks"
            )
        super().__init__(in_features, out_features // group.world_size, bias=True)
        for param in (self.weight, self.bias):
            # Plain functions, not bound methods: the loader reads a bound one's owner as a merged
            # layer (its `shard_offsets`).
            param.weight_loader = partial(_load_stacked_rows, parts=parts, group=group)
            param.full_shape = (out_features, *param.shape[1:])
            param.load_full = partial(param.weight_loader, param)


class ReducingRowParallelLinear(RowParallelLinear):
    """This rank's input columns, summed over the ranks, then the bias (whole on every rank,
    added once): y = all_reduce(x_r @ W[:, cols of r].T) + b."""

    def __init__(self, in_features: int, out_features: int, group: TensorParallelGroup) -> None:
        super().__init__(in_features, out_features, group)
        self.bias = nn.Parameter(torch.empty(out_features))  # after the weight, as in nn.Linear

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.group.all_reduce(F.linear(x, self.weight)).add_(self.bias)


def _load_stacked_rows(
    param: nn.Parameter,
    loaded: torch.Tensor,
    shard_id: object = None,
    *,
    parts: int,
    group: TensorParallelGroup,
) -> None:
    """A whole checkpoint tensor of `parts` stacked projections -> this rank's rows of each, in
    the same order ([q_r; k_r; v_r] from [q; k; v])."""
    stacked = loaded.unflatten(0, (parts, -1))
    mine = Split(1, group.world_size).take(stacked, group.rank, group.world_size)
    default_weight_loader(param, mine.flatten(0, 1), shard_id)
