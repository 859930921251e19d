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


CPU_ROW_BLOCK = 128  # rows per matmul of `patch_projection` on the CPU: one kernel shape always


def patch_projection(
    patches: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """`patches @ weight.t() + bias` (a stride-equals-kernel convolution's weight, flattened),
    each row's result the same whatever other rows come with it.

    On the CPU, MKL's sgemm picks its kernel, and with it the order of each row's sums, by the
    number of rows: a patch's embedding moved in the sixth digit with the size of its batch (an
    AVX-512 Xeon, 1176 columns: 480 rows against 192). An image encoded alone, or a video's frames
    split over two encoders (IRP), must give the bytes of the batch they would have been in, so on
    the CPU the rows go through in blocks of CPU_ROW_BLOCK, the last one padded with zeros. On a
    GPU one matmul: the tower's speed (its tests compare within tolerances).
    """
    patches = patches.to(weight.dtype)
    if patches.device.type != "cpu":
        return torch.addmm(bias, patches, weight.t()) if bias is not None else patches @ weight.t()
    rows = patches.shape[0]
    padded = torch.nn.functional.pad(patches, (0, 0, 0, -rows % CPU_ROW_BLOCK))
    blocks = [block @ weight.t() for block in padded.split(CPU_ROW_BLOCK)]
    out = torch.cat(blocks)[:rows] if blocks else padded.new_empty(0, weight.shape[0])
    return out + bias if bias is not None else out
