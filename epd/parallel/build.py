"""One tensor-parallel rank's model: built with its share of the layers, loaded with its share of
the weights. At degree 1 (no group, or a group of one) exactly `epd.models.loader.build_model`.

Every rank reads the whole checkpoint and keeps only its share: the loader's loop is unchanged,
each parallel parameter's `weight_loader` cuts the checkpoint tensor it is handed
(epd.parallel.linear). Reading only the share (safetensors' `get_slice`) would save a rank the
I/O of the rest; not done yet. Dummy weights draw the single-device model's values and keep the
share (epd.models.loader.init_dummy_weights), so a tp2 dummy model computes what tp1 computes.
The vision tower is whole on every rank unless `split_vision` asks for it split (epd.parallel.vision).
"""

from __future__ import annotations

from functools import partial
from pathlib import Path

import torch
from torch import nn

from epd.models.config import VLModelConfig
from epd.models.loader import build_model
from epd.models.qwen2_vl import ALL_PARTS, VISION
from epd.parallel.context import building_rank
from epd.parallel.group import TensorParallelGroup, is_parallel
from epd.parallel.sharding import check_splittable, check_vision_splittable, rank_config


def build_rank_model(
    model_dir: str | Path,
    group: TensorParallelGroup | None,
    *,
    parts: frozenset[str] = ALL_PARTS,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_format: str = "safetensors",
    seed: int = 0,
    split_vision: bool = False,
) -> nn.Module:
    """`build_model` for rank `group.rank` of `group.world_size`.

    The returned model's `config` is this rank's view (`epd.parallel.sharding.rank_config`): its
    heads, kv heads and MLP width, which is what the KV cache and the memory profile size for.
    The vision tower, when in `parts`, is whole on every rank (replicated); with `split_vision`
    each rank holds its heads and MLP columns of it, and every rank must then run each encode.
    """
    build = partial(
        build_model, model_dir, parts=parts, dtype=dtype, device=device, load_format=load_format, seed=seed
    )
    if not is_parallel(group):
        return build()
    config = VLModelConfig.from_pretrained(model_dir)
    check_splittable(config.text, group.world_size)
    if split_vision and VISION in parts:
        check_vision_splittable(config.vision, group.world_size)
    with building_rank(group, split_vision=split_vision):  # the layers built now take this rank's share
        model = build()
    model.config = rank_config(config, group.world_size)
    return model
