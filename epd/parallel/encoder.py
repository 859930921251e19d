"""An encoder-only instance over several GPUs (`1E@tp2`): the vision tower split, driven from rank 0.

The E stage of degree n runs the split tower (epd.parallel.vision: each rank its heads and MLP
columns, two all-reduces a block), so every rank encodes every batch together and one large
image takes about 1/n of its single-GPU time plus the all-reduces. Rank 0 is the instance, as at
degree 1: its `EncoderWorker` (queue, patch budget, MM cache, sends) calls the tower as it always
does; the tower it holds is a `TowerOverRanks`, which first tells the workers to encode the same
batch and gives them its patches:

    rank 0:  EncoderWorker._launch -> model.encode_images -> TowerOverRanks(patches, grids):
             send EncodeImages(grids, shape, dtype) -> broadcast patches -> its share of the tower
    worker:  EncodeImages received -> patches (broadcast) -> its share of the tower (same all-reduces)

Every rank ends with the whole embeddings (the last all-reduce and the replicated merger); only
rank 0's are used. A worker's first command says which it builds (`BuildVision`: the tower alone,
split), as an LLM worker's says `BuildRank` (epd.parallel.worker). The tower is launched eagerly:
CUDA graphs of the tower (`--vision-cuda-graphs`) are for one device (`TowerOverRanks` is not a
tower they can capture). Replicated E (each GPU its own images) needs no parallelism: it is n E
instances (`nE`).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from epd.clock import Clock
from epd.config import ModelConfig
from epd.models.qwen2_vl import VISION
from epd.parallel.build import build_rank_model
from epd.parallel.commands import BuildVision, EncodeImages, Stop
from epd.parallel.group import TensorParallelGroup

Grid = tuple[int, int, int]


class TowerOverRanks(nn.Module):
    """Rank 0's split tower, called as the tower is (`forward(patches, grids)`), each call run by
    every rank of `group`."""

    def __init__(self, tower: nn.Module, group: TensorParallelGroup) -> None:
        super().__init__()
        self.tower, self.group = tower, group

    def forward(self, patches: torch.Tensor, grids: Sequence[Grid]) -> torch.Tensor:
        grids = [tuple(g) for g in grids]
        self.group.send_command(EncodeImages(grids, tuple(patches.shape), patches.dtype))
        self.group.broadcast(patches.contiguous())
        return self.tower(patches, grids)


def split_vision_tower(group: TensorParallelGroup):
    """A `VisionFactory` (epd.cluster.instance.encode_stage) for rank 0 of an encoder-only instance
    whose workers wait in `epd.parallel.worker.build_worker`: they build their shares as it builds
    its own."""

    def load(model: ModelConfig, device: torch.device, clock: Clock) -> nn.Module:
        group.send_command(BuildVision(model))
        built = _build(model, group, device)
        built.visual = TowerOverRanks(built.visual, group)
        return built

    return load


class VisionRankWorker:
    """A worker of an encoder-only instance: encodes what rank 0 encodes, until `Stop`."""

    def __init__(self, model: nn.Module, group: TensorParallelGroup, device: torch.device) -> None:
        self.tower, self.group, self.device = model.visual, group, device
        self.commands_run = 0

    def serve(self) -> None:
        while not isinstance(command := self.group.receive_command(), Stop):
            if not isinstance(command, EncodeImages):
                raise RuntimeError(f"vision worker {self.group.rank}: unexpected {command!r}")
            patches = torch.empty(command.shape, dtype=command.dtype, device=self.device)
            self.group.broadcast(patches)
            with torch.inference_mode():
                self.tower(patches, command.grids)
            self.commands_run += 1


def build_vision_worker(group: TensorParallelGroup, device: str, command: BuildVision) -> VisionRankWorker:
    torch_device = torch.device(device)
    return VisionRankWorker(_build(command.model, group, torch_device), group, torch_device)


def _build(model: ModelConfig, group: TensorParallelGroup, device: torch.device) -> nn.Module:
    """This rank's share of the split tower (no language weights)."""
    return build_rank_model(
        model.model,
        group,
        parts=frozenset({VISION}),
        dtype=model.torch_dtype,
        device=device,
        load_format=model.load_format,
        seed=model.seed,
        split_vision=True,
    )
