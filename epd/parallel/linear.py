"""Column- and row-parallel linear layers, and the factories the decoder builds its projections with.

    column-parallel  y_r = x @ W[rows of r].T        output split: this rank's heads / MLP columns
    row-parallel     y   = sum_r x_r @ W[:, cols of r].T   input split; the caller all-reduces

A column-parallel layer here is always merged (q/k/v, gate/up in one matmul, as on one device):
`MergedColumnParallelLinear` cuts each checkpoint tensor by its own `Split` (q by query heads,
k/v by kv heads) before copying it into its rows. The all-reduce after a row-parallel layer is
the decoder's to call, not this layer's: on the GPU `fused.linear` sends one-row inputs through
the Triton GEMV with the layer's weight, bypassing `forward`.

Each parameter also carries `full_shape` and `load_full(full)`: its single-device shape and how to
take its share of a tensor of that shape, so that dummy weights at any degree are slices of
the single-device ones (`epd.parallel.build`).

The LM head is split by vocabulary rows (`VocabParallelHead`): each rank multiplies its rows and
an all-gather gives every rank the whole logits (rank 0 samples; the workers run it for the
collective). Tied to the embedding (which stays whole on every rank), it reads its rows of the
embedding's weight.

At degree 1 the factories return exactly the single-device layers (`MergedLinear`, `nn.Linear`).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import NamedTuple

import torch
from torch import nn
from torch.nn import functional as F

from epd.models.layers.linear import MergedLinear, default_weight_loader
from epd.parallel.context import building_group
from epd.parallel.group import TensorParallelGroup
from epd.parallel.sharding import HeadSplit, Split


class ColumnShard(NamedTuple):
    """One projection of a merged layer: its checkpoint shard id, single-device output size, and
    how many pieces it is cut into (None: one per rank)."""

    name: object
    full_size: int
    pieces: int | None = None


def heads_of_rank(num_heads: int, num_kv_heads: int) -> HeadSplit:
    """The attention heads of the rank being built (all of them on a single device)."""
    group = building_group()
    return HeadSplit(num_heads, num_kv_heads, group.world_size if group else 1)


def merged_column_linear(in_features: int, shards: Sequence[ColumnShard], bias: bool) -> MergedLinear:
    group = building_group()
    if group is None:
        return MergedLinear(in_features, [(s.name, s.full_size) for s in shards], bias=bias)
    return MergedColumnParallelLinear(in_features, shards, bias, group)


def row_parallel_linear(in_features: int, out_features: int) -> nn.Linear:
    """`in_features`: the single-device input width (this rank's is its share of it)."""
    group = building_group()
    if group is None:
        return nn.Linear(in_features, out_features, bias=False)
    return RowParallelLinear(in_features, out_features, group)


class MergedColumnParallelLinear(MergedLinear):
    """This rank's rows of each merged projection, one matmul; the output stays split."""

    def __init__(
        self, in_features: int, shards: Sequence[ColumnShard], bias: bool, group: TensorParallelGroup
    ) -> None:
        splits = {s.name: Split(0, s.pieces or group.world_size) for s in shards}
        local = [(s.name, s.full_size // splits[s.name].pieces) for s in shards]
        super().__init__(in_features, local, bias=bias)
        self.group, self.splits = group, splits
        self.full_offsets, offset = {}, 0
        for s in shards:
            self.full_offsets[s.name] = (offset, s.full_size)
            offset += s.full_size
        for param in self.parameters():
            param.full_shape = (offset, *param.shape[1:])
            param.load_full = partial(self._load_full, param)

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        """A whole checkpoint tensor (q_proj.weight, ...) -> this rank's rows of it."""
        if shard_id in self.splits:
            loaded = self.splits[shard_id].take(loaded, self.group.rank, self.group.world_size)
        super()._load_shard(param, loaded, shard_id)  # an unknown shard id fails there, clearly

    def _load_full(self, param: nn.Parameter, full: torch.Tensor) -> None:
        for name, (offset, size) in self.full_offsets.items():
            self._load_shard(param, full.narrow(0, offset, size), name)


class RowParallelLinear(nn.Linear):
    """This rank's input columns: a partial product the ranks' all-reduce sums. No bias: it
    would have to be added once, after the sum (Qwen2's o_proj and down_proj have none)."""

    def __init__(self, in_features: int, out_features: int, group: TensorParallelGroup) -> None:
        if in_features % group.world_size:
            raise ValueError(f"input width {in_features} cannot be split over {group.world_size} ranks")
        super().__init__(in_features // group.world_size, out_features, bias=False)
        self.group, self.split = group, Split(1, group.world_size)
        # A plain function, not a bound method: the loader reads a bound one's owner as a merged
        # layer (its `shard_offsets`).
        self.weight.weight_loader = partial(_load_split, split=self.split, group=group)
        self.weight.full_shape = (out_features, in_features)
        self.weight.load_full = partial(_load_split, self.weight, split=self.split, group=group)


def _load_split(
    param: nn.Parameter,
    loaded: torch.Tensor,
    shard_id: object = None,
    *,
    split: Split,
    group: TensorParallelGroup,
) -> None:
    default_weight_loader(param, split.take(loaded, group.rank, group.world_size), shard_id)


def lm_head_linear(hidden_size: int, vocab_size: int, tied: nn.Embedding | None) -> nn.Module:
    """The LM head: at degree 1 (or a vocabulary that does not split evenly) the plain layer,
    tied to `tied`'s weight when given; else this rank's vocabulary rows (`VocabParallelHead`)."""
    group = building_group()
    if group is None or vocab_size % group.world_size:
        head = nn.Linear(hidden_size, vocab_size, bias=False)
        if tied is not None:
            head.weight = tied.weight
        return head
    return VocabParallelHead(hidden_size, vocab_size, group, tied)


class VocabParallelHead(nn.Module):
    """logits = all_gather(hidden @ W[this rank's vocabulary rows].T): every rank's call is one
    collective, so every rank calls it in each step (`gathers`), graphs included."""

    gathers = True

    def __init__(
        self, hidden_size: int, vocab_size: int, group: TensorParallelGroup, tied: nn.Embedding | None
    ) -> None:
        super().__init__()
        self.group, self.rows = group, vocab_size // group.world_size
        self.start = group.rank * self.rows
        # Tied: the embedding is whole on every rank; its rows are read at each call (a view), and
        # it is kept outside this module's parameters (the model owns it once).
        self.__dict__["tied"] = tied
        if tied is None:
            self.weight = nn.Parameter(torch.empty(self.rows, hidden_size))
            split = Split(0, group.world_size)
            self.weight.weight_loader = partial(_load_split, split=split, group=group)
            self.weight.full_shape = (vocab_size, hidden_size)
            self.weight.load_full = partial(_load_split, self.weight, split=split, group=group)

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        tied = self.__dict__["tied"]
        weight = self.weight if tied is None else tied.weight.narrow(0, self.start, self.rows)
        return self.group.all_gather(F.linear(hidden, weight), dim=-1)
