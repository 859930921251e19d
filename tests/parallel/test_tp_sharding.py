"""What each tensor-parallel rank of the tiny Qwen2.5-VL decoder holds (4 heads, 2 kv heads, MLP
width 128), built in this process: a share needs only (rank, world size), not a joined group."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from epd.bench.roofline_setup import BENCH_CONFIGS
from epd.engine.kv_cache import allocate_kv_cache, bytes_per_block
from epd.models.config import VLModelConfig
from epd.models.layers.linear import MergedLinear
from epd.models.loader import build_model
from epd.models.qwen2_vl import LANGUAGE
from epd.parallel.build import build_rank_model
from epd.parallel.group import TensorParallelGroup
from epd.parallel.sharding import check_splittable, rank_config, split_of

LANGUAGE_ONLY = frozenset({LANGUAGE})


@pytest.fixture(scope="module")
def model_dir(checkpoints):
    return checkpoints["qwen2_5_vl"]


def _ranks(model_dir, world_size: int, **kwargs) -> list[nn.Module]:
    return [
        build_rank_model(model_dir, TensorParallelGroup(r, world_size), parts=LANGUAGE_ONLY, **kwargs)
        for r in range(world_size)
    ]


def _held(model: nn.Module, hf_name: str) -> torch.Tensor:
    """The rows of `model`'s parameter that hold checkpoint tensor `hf_name` (its share of it)."""
    name, shard = model.map_weight_name(hf_name)
    param = model.get_parameter(name)
    owner = getattr(param.weight_loader, "__self__", None) if hasattr(param, "weight_loader") else None
    if isinstance(owner, MergedLinear):
        offset, size = owner.shard_offsets[shard]
        return param.narrow(0, offset, size)
    return param


@pytest.mark.parametrize("world_size", [2, 4])
def test_each_rank_holds_its_split_of_every_checkpoint_tensor(model_dir, world_size):
    tensors = load_file(model_dir / "model.safetensors")
    config = build_model(model_dir, parts=LANGUAGE_ONLY).config.text
    for rank, model in enumerate(_ranks(model_dir, world_size)):
        checked = 0
        for hf_name, tensor in tensors.items():
            if model.map_weight_name(hf_name) is None:
                continue  # the vision tower's: not built here
            split = split_of(hf_name, config, world_size)
            expected = tensor if split is None else split.take(tensor, rank, world_size)
            assert torch.equal(_held(model, hf_name), expected), hf_name
            checked += 1
        assert checked == sum(model.map_weight_name(n) is not None for n in tensors)


def test_heads_and_mlp_columns_are_cut_as_megatron_does(model_dir):
    """tp2: q heads {0,1} | {2,3}, kv head 0 | 1; tp4 (fewer kv heads than ranks): kv head r // 2.
    o_proj and down_proj by input columns, gate/up by output rows."""
    tensors = load_file(model_dir / "model.safetensors")
    name = {p: f"model.layers.1.self_attn.{p}.weight" for p in ("q_proj", "k_proj", "o_proj")}
    name["down_proj"] = "model.layers.1.mlp.down_proj.weight"
    q, k, o, down = (tensors[name[p]] for p in ("q_proj", "k_proj", "o_proj", "down_proj"))
    d = 16  # head size
    for r, model in enumerate(_ranks(model_dir, 2)):
        assert torch.equal(_held(model, name["q_proj"]), q[r * 2 * d : (r + 1) * 2 * d])
        assert torch.equal(_held(model, name["k_proj"]), k[r * d : (r + 1) * d])
        assert torch.equal(_held(model, name["o_proj"]), o[:, r * 2 * d : (r + 1) * 2 * d])
        assert torch.equal(_held(model, name["down_proj"]), down[:, r * 64 : (r + 1) * 64])
    for r, model in enumerate(_ranks(model_dir, 4)):
        assert torch.equal(_held(model, name["q_proj"]), q[r * d : (r + 1) * d])
        kv_head = r // 2
        assert torch.equal(_held(model, name["k_proj"]), k[kv_head * d : (kv_head + 1) * d])


def test_rank_config_sizes_the_kv_cache_for_the_ranks_kv_heads(model_dir):
    full = build_model(model_dir, parts=LANGUAGE_ONLY).config.text
    rank = _ranks(model_dir, 2)[1]
    local = rank.config.text
    assert (local.num_attention_heads, local.num_key_value_heads, local.head_dim) == (2, 1, full.head_dim)
    assert local.intermediate_size == full.intermediate_size // 2
    assert bytes_per_block(local, 4, torch.float32) * 2 == bytes_per_block(full, 4, torch.float32)
    cache = allocate_kv_cache(local, 3, 4, torch.float32, "cpu")
    assert cache.shape == (full.num_hidden_layers, 2, 3, 4, 1, full.head_dim)
    assert all(layer.self_attn.attn.num_kv_heads == 1 for layer in rank.model.layers)


def test_dummy_shares_are_the_single_device_dummy_weights_cut(model_dir):
    whole = dict(build_model(model_dir, parts=LANGUAGE_ONLY, load_format="dummy", seed=3).named_parameters())
    for model in _ranks(model_dir, 2, load_format="dummy", seed=3):
        for name, param in model.named_parameters():
            expected = whole[name]
            if hasattr(param, "load_full"):
                expected = _share_of(param, expected)
            assert torch.equal(param, expected), name


def _share_of(param: nn.Parameter, full: torch.Tensor) -> torch.Tensor:
    """What `param`'s cutting rule (the checkpoint loader's, checked above) keeps of `full`."""
    saved = param.detach().clone()
    param.load_full(full)
    share = param.detach().clone()
    param.copy_(saved)
    return share


def test_degree_one_builds_the_single_device_model(model_dir):
    whole = build_model(model_dir, parts=LANGUAGE_ONLY)
    for group in (None, TensorParallelGroup(0, 1)):
        model = build_rank_model(model_dir, group, parts=LANGUAGE_ONLY)
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert type(attn.qkv_proj) is MergedLinear and type(attn.o_proj) is nn.Linear
        assert type(mlp.gate_up_proj) is MergedLinear and type(mlp.down_proj) is nn.Linear
        assert attn.tp is None and mlp.tp is None
        assert model.config == whole.config
        state, expected = model.state_dict(), whole.state_dict()
        assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)


def test_degrees_the_heads_do_not_divide_are_refused(model_dir):
    with pytest.raises(ValueError, match="4 attention heads cannot be split over 3 ranks"):
        build_rank_model(model_dir, TensorParallelGroup(0, 3), parts=LANGUAGE_ONLY)
    with pytest.raises(ValueError, match="4 attention heads cannot be split over 8 ranks"):
        build_rank_model(model_dir, TensorParallelGroup(0, 8), parts=LANGUAGE_ONLY)


@pytest.mark.parametrize(
    "world_size, heads, kv_heads, mlp", [(2, 32, 4, 14784), (4, 16, 2, 7392), (8, 8, 1, 3696)]
)
def test_the_72b_shape_splits_at_2_4_and_8(world_size, heads, kv_heads, mlp):
    """epd/bench/configs/qwen2_5_vl_72b.json (Qwen2.5-VL-72B-Instruct's shape: 64 heads, 8 kv heads,
    MLP 29568, 80 layers) as a rank of each degree sees it; the benchmarks run it @tp2 and @tp4."""
    config = VLModelConfig.from_dict(json.loads((BENCH_CONFIGS / "qwen2_5_vl_72b.json").read_text()))
    check_splittable(config.text, world_size)
    local = rank_config(config, world_size).text
    assert (local.num_attention_heads, local.num_key_value_heads, local.intermediate_size) == (
        heads,
        kv_heads,
        mlp,
    )
    assert (local.head_dim, local.num_hidden_layers, config.vision.out_hidden_size) == (128, 80, 8192)
