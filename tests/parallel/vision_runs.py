"""What the split vision tower's tests run on each rank (spawned processes import it by name)."""

from __future__ import annotations

import io
from dataclasses import dataclass

import torch

from epd.models.qwen2_vl import VISION
from epd.parallel.build import build_rank_model
from epd.parallel.group import TensorParallelGroup

VISION_ONLY = frozenset({VISION})
Grid = tuple[int, int, int]
Case = tuple[torch.Tensor, list[Grid]]  # packed patches of some images, their grids


@dataclass
class SplitRun:
    # torch.save'd, by value: a tensor pickled into the result pipe travels as shared memory that
    # the rank's process, which may have ended by then, would have to hand over.
    saved_embeddings: bytes
    qkv_rows: int  # rows of the first block's fused qkv this rank holds

    def embeddings(self) -> list[list[torch.Tensor]]:
        """Per case, one tensor per image."""
        return torch.load(io.BytesIO(self.saved_embeddings))


def encode_split(
    group: TensorParallelGroup, model_dir: str, cases: list[Case], load_format: str = "safetensors"
) -> SplitRun:
    """Each case encoded by this rank's share of the split tower (every rank runs every case:
    the all-reduces pair up)."""
    torch.set_num_threads(1)  # the ranks share two cores
    model = build_rank_model(model_dir, group, parts=VISION_ONLY, load_format=load_format, split_vision=True)
    with torch.no_grad():
        embeddings = [model.encode_images(patches, grids) for patches, grids in cases]
    saved = io.BytesIO()
    torch.save(embeddings, saved)
    return SplitRun(saved.getvalue(), model.visual.blocks[0].attn.qkv.weight.shape[0])
