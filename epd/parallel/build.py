"""One tensor-parallel rank's model: built with its share of the layers, loaded with its share of
the weights. At degree 1 (no group, or a group of one) exactly `epd.models.loader.build_model`.

Every rank reads the whole checkpoint and keeps only its share: the loader's loop is unchanged,
each parallel parameter's `weight_loader` cuts the checkpoint tensor it is handed
(epd.parallel.linear). Reading only the share (safetensors' `get_slice`) would save a rank the
I/O of the rest; not done yet. Dummy weights draw the single-device model's values and keep the
share, so a tp2 dummy model computes what the tp1 dummy model computes.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from epd.models.config import VLModelConfig
from epd.models.loader import build_model, load_weights
from epd.models.qwen2_vl import ALL_PARTS
from epd.models.registry import get_model_class
from epd.parallel.context import building_rank
from epd.parallel.group import TensorParallelGroup, is_parallel
from epd.parallel.sharding import check_splittable, rank_config


def build_rank_model(
    model_dir: str | Path,
    group: TensorParallelGroup | None,
    *,
    parts: frozenset[str] = ALL_PARTS,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_format: str = "safetensors",
    seed: int = 0,
) -> nn.Module:
    """`build_model` for rank `group.rank` of `group.world_size`.

    The returned model's `config` is this rank's view (`epd.parallel.sharding.rank_config`): its
    heads, kv heads and MLP width, which is what the KV cache and the memory profile size for.
    The vision tower, when in `parts`, is whole on every rank (replicated).
    """
    if not is_parallel(group):
        return build_model(
            model_dir, parts=parts, dtype=dtype, device=device, load_format=load_format, seed=seed
        )
    config = VLModelConfig.from_pretrained(model_dir)
    check_splittable(config.text, group.world_size)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), building_rank(group):
            model = get_model_class(config.architecture)(config, parts=parts)
    finally:
        torch.set_default_dtype(previous)
    model.config = rank_config(config, group.world_size)
    if load_format == "dummy":
        init_dummy_shares(model, seed)
    elif load_format in ("safetensors", "auto"):
        load_weights(model, Path(model_dir))
    else:
        raise ValueError(f"unknown load_format {load_format!r}; use 'safetensors' or 'dummy'")
    return model.eval().requires_grad_(False)


@torch.no_grad()
def init_dummy_shares(model: nn.Module, seed: int = 0) -> None:
    """`epd.models.loader.init_dummy_weights` as the single-device model draws them (the same
    generator over the same shapes in the same order), each split parameter keeping its share.
    The rule (norm weights 1, the rest normal(0, 0.02)) must stay the loader's: the tests
    compare a rank's dummy weights with slices of the single-device ones."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        if param.dim() == 1 and ("norm" in name or "ln_q" in name):
            param.fill_(1.0)
            continue
        load_full = getattr(param, "load_full", None)
        if load_full is None:
            param.normal_(0.0, 0.02, generator=gen)
            continue
        full = torch.empty(param.full_shape, dtype=param.dtype, device=param.device)
        load_full(full.normal_(0.0, 0.02, generator=gen))
