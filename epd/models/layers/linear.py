"""Linear layers that know how to load their weights from checkpoint tensors.

Each parameter carries a `weight_loader(param, tensor, shard_id)` so the weight loader
stays a short loop. Fused layers take several checkpoint tensors (q/k/v, gate/up) into
one matrix: one matmul instead of several, same numbers.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


def default_weight_loader(param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
    if param.shape != loaded.shape:
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint {tuple(loaded.shape)}")
    param.data.copy_(loaded)


class MergedLinear(nn.Linear):
    """One matmul for several projections of the same input, stacked along the output dim.

    `shards` names each part (e.g. ("q", "k", "v")) with its output size; the checkpoint's
    separate tensors are copied into their rows by name.
    """

    def __init__(self, in_features: int, shards: Sequence[tuple[str, int]], bias: bool) -> None:
        super().__init__(in_features, sum(size for _, size in shards), bias=bias)
        self.shard_offsets: dict[str, tuple[int, int]] = {}
        offset = 0
        for name, size in shards:
            self.shard_offsets[name] = (offset, size)
            offset += size
        self.weight.weight_loader = self._load_shard
        if bias:
            self.bias.weight_loader = self._load_shard

    def _load_shard(self, param: nn.Parameter, loaded: torch.Tensor, shard_id: object = None) -> None:
        if shard_id not in self.shard_offsets:
            raise ValueError(f"unknown shard {shard_id!r}; expected one of {list(self.shard_offsets)}")
        offset, size = self.shard_offsets[shard_id]
        default_weight_loader(param.data.narrow(0, offset, size), loaded)
