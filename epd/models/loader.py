"""Build a model from a local Hugging Face directory (or with random weights of the real shape)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from epd.models.config import VLModelConfig
from epd.models.layers.linear import default_weight_loader
from epd.models.qwen2_vl import ALL_PARTS
from epd.models.registry import get_model_class


def build_model(
    model_dir: str | Path,
    *,
    parts: frozenset[str] = ALL_PARTS,
    dtype: torch.dtype = torch.float32,
    device: str | torch.device = "cpu",
    load_format: str = "safetensors",
    seed: int = 0,
) -> nn.Module:
    """Instantiate the checkpoint's architecture holding only `parts`, weights loaded, in eval mode."""
    config = VLModelConfig.from_pretrained(model_dir)
    cls = get_model_class(config.architecture)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = cls(config, parts=parts)
    finally:
        torch.set_default_dtype(previous)
    if load_format == "dummy":
        init_dummy_weights(model, seed)
    elif load_format in ("safetensors", "auto"):
        load_weights(model, Path(model_dir))
    else:
        raise ValueError(f"unknown load_format {load_format!r}; use 'safetensors' or 'dummy'")
    return model.eval().requires_grad_(False)


def checkpoint_files(model_dir: Path) -> list[Path]:
    index = model_dir / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [model_dir / name for name in sorted(set(weight_map.values()))]
    single = model_dir / "model.safetensors"
    if single.exists():
        return [single]
    files = sorted(model_dir.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {model_dir}")
    return files


@torch.no_grad()
def load_weights(model: nn.Module, model_dir: Path) -> None:
    """Copy every checkpoint tensor the model holds into it; error on anything left unloaded."""
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded: dict[str, set[object]] = {}
    for path in checkpoint_files(model_dir):
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for ckpt_name in f.keys():
                target = model.map_weight_name(ckpt_name)
                if target is None:
                    continue
                name, shard = target
                if name not in params:
                    raise ValueError(f"checkpoint tensor {ckpt_name!r} maps to unknown parameter {name!r}")
                param = params[name]
                loader = getattr(param, "weight_loader", default_weight_loader)
                loader(param, f.get_tensor(ckpt_name), shard)
                loaded.setdefault(name, set()).add(shard)
    _check_all_loaded(model, loaded)


def _check_all_loaded(model: nn.Module, loaded: dict[str, set[object]]) -> None:
    missing = [name for name, param in model.named_parameters() if loaded.get(name, set()) != _shards(param)]
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ValueError(f"checkpoint is missing {len(missing)} weights: {shown}")


def _shards(param: nn.Parameter) -> set[object]:
    """The shard ids a (possibly fused) parameter must receive: {None} for a plain one."""
    owner = getattr(getattr(param, "weight_loader", None), "__self__", None)
    return set(owner.shard_offsets) if owner is not None else {None}


@torch.no_grad()
def init_dummy_weights(model: nn.Module, seed: int = 0) -> None:
    """Random weights of the real shapes, for benchmarks: small normal matrices, unit norms.

    A tensor-parallel rank's split parameter (`load_full`: epd.parallel.linear) draws its
    single-device values and keeps its share, so every degree computes what degree 1 computes."""
    # Generated on the parameter's device: filling a 7B model from the host is minutes.
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, param in model.named_parameters():
        load_full = getattr(param, "load_full", None)
        if param.dim() == 1 and ("norm" in name or "ln_q" in name):
            param.fill_(1.0)
        elif load_full is None:
            param.normal_(0.0, 0.02, generator=gen)
        else:
            full = torch.empty(param.full_shape, dtype=param.dtype, device=param.device)
            load_full(full.normal_(0.0, 0.02, generator=gen))
