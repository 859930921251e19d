"""The vision tower split over tensor-parallel ranks (epd.parallel.vision): ranks spawned and
joined over gloo, the tiny checkpoints of both families (2 vision heads: tp2), fp32.

Split, every rank computes the single-device tower's embeddings, for one image and for several
of different sizes packed together; dummy weights at tp4 (a 4-head copy of the config) are slices
of the single-device ones. Each rank holds its heads' rows of the fused qkv and its MLP columns.
Without the switch a tensor-parallel build keeps the whole tower on every rank (replicated)."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file
from torch import nn
from vision_runs import VISION_ONLY, encode_split

from epd.models.layers.linear import MergedLinear
from epd.models.loader import build_model
from epd.parallel.build import build_rank_model
from epd.parallel.group import TensorParallelGroup
from epd.parallel.launch import run_on_ranks

ONE_IMAGE = [(1, 8, 12)]
# Different sizes, non-square, one larger than a Qwen2.5 window in both directions.
SEVERAL_IMAGES = [(1, 8, 12), (1, 4, 4), (1, 14, 6), (1, 2, 20)]


def _cases(patch_dim: int) -> list[tuple[torch.Tensor, list]]:
    gen = torch.Generator().manual_seed(0)
    return [
        (torch.randn(sum(t * h * w for t, h, w in grids), patch_dim, generator=gen), grids)
        for grids in (ONE_IMAGE, SEVERAL_IMAGES)
    ]


def _assert_same_embeddings(runs, reference, cases) -> None:
    for run in runs:
        for got, expected, (_, grids) in zip(run.embeddings(), reference, cases, strict=True):
            assert len(got) == len(expected) == len(grids)
            for g, e in zip(got, expected):
                torch.testing.assert_close(g, e, atol=1e-5, rtol=0)


@torch.no_grad()
def test_split_tower_encodes_what_one_device_does(checkpoint):
    single = build_model(checkpoint, parts=VISION_ONLY)
    cases = _cases(single.config.vision.patch_dim)
    reference = [single.encode_images(patches, grids) for patches, grids in cases]
    runs = run_on_ranks(encode_split, 2, str(checkpoint), cases)
    _assert_same_embeddings(runs, reference, cases)
    assert all(run.qkv_rows == 3 * single.config.vision.hidden_size // 2 for run in runs)


@torch.no_grad()
def test_split_dummy_weights_at_tp4_are_slices_of_one_devices(checkpoint, tmp_path):
    config = json.loads((checkpoint / "config.json").read_text())
    config["vision_config"]["num_heads"] = 4  # 32 wide: heads of 8
    (tmp_path / "config.json").write_text(json.dumps(config))
    single = build_model(tmp_path, parts=VISION_ONLY, load_format="dummy")
    cases = _cases(single.config.vision.patch_dim)
    reference = [single.encode_images(patches, grids) for patches, grids in cases]
    runs = run_on_ranks(encode_split, 4, str(tmp_path), cases, "dummy")
    _assert_same_embeddings(runs, reference, cases)
    assert all(run.qkv_rows == 3 * single.config.vision.hidden_size // 4 for run in runs)


def _expected_share(hf_name: str, tensor: torch.Tensor, rank: int, world: int) -> torch.Tensor:
    """The rows or columns of a vision block's checkpoint tensor that `rank` should hold."""
    if ".attn.qkv." in hf_name:  # [q; k; v]: this rank's heads of each
        return torch.cat([third.chunk(world)[rank] for third in tensor.chunk(3)])
    if hf_name.endswith((".attn.proj.weight", ".fc2.weight", ".down_proj.weight")):
        return tensor.chunk(world, dim=1)[rank]
    if any(f".{name}." in hf_name for name in ("fc1", "gate_proj", "up_proj")):
        return tensor.chunk(world)[rank]
    return tensor  # norms, the row-parallel layers' biases: whole


def _held(model: nn.Module, hf_name: str) -> torch.Tensor:
    name, shard = model.map_weight_name(hf_name)
    param = model.get_parameter(name)
    owner = getattr(getattr(param, "weight_loader", None), "__self__", None)
    if isinstance(owner, MergedLinear):  # gate/up: the shard's rows
        offset, size = owner.shard_offsets[shard]
        return param.narrow(0, offset, size)
    return param


def test_each_rank_holds_its_heads_and_columns_of_every_block_tensor(checkpoint):
    tensors = load_file(checkpoint / "model.safetensors")
    block_tensors = {name: t for name, t in tensors.items() if "visual.blocks." in name}
    assert any(".attn.qkv.weight" in name for name in block_tensors)
    for rank in range(2):
        group = TensorParallelGroup(rank, 2)  # a share needs no joined group
        model = build_rank_model(checkpoint, group, parts=VISION_ONLY, split_vision=True)
        for hf_name, tensor in block_tensors.items():
            expected = _expected_share(hf_name, tensor, rank, 2)
            assert torch.equal(_held(model, hf_name), expected), hf_name


def test_a_tensor_parallel_llm_build_keeps_the_whole_tower(checkpoint):
    whole = build_model(checkpoint)
    rank = build_rank_model(checkpoint, TensorParallelGroup(1, 2))
    assert rank.model.layers[0].self_attn.q_size < whole.model.layers[0].self_attn.q_size  # LLM split
    expected = dict(whole.visual.named_parameters())
    got = dict(rank.visual.named_parameters())
    assert got.keys() == expected.keys()
    for name, param in got.items():
        assert torch.equal(param, expected[name]), name
        assert not hasattr(param, "full_shape"), name  # no split layer anywhere in the tower
    assert rank.visual.blocks[0].attn.num_heads == whole.config.vision.num_heads


def test_degree_one_split_is_the_single_device_tower(checkpoint):
    split = build_rank_model(checkpoint, TensorParallelGroup(0, 1), parts=VISION_ONLY, split_vision=True)
    plain = build_model(checkpoint, parts=VISION_ONLY)
    kinds = [type(m) for m in split.visual.modules()]
    assert kinds == [type(m) for m in plain.visual.modules()]
    assert nn.Linear in kinds and all(k.__module__.startswith(("torch.", "epd.models")) for k in kinds)


def test_a_tower_that_cannot_be_split_is_refused(checkpoint):
    with pytest.raises(ValueError, match="vision tower's 2 heads cannot be split over 4 ranks"):
        build_rank_model(checkpoint, TensorParallelGroup(0, 4), parts=VISION_ONLY, split_vision=True)
