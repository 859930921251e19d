"""The vision tower replayed as CUDA graphs (epd.models.vision_graphs) gives the eager tower's rows,
and an encoder-only instance with --vision-cuda-graphs gives the aggregated engine's tokens."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from epd import LLM, SamplingParams
from epd.models.loader import build_model
from epd.models.qwen2_vl import VISION
from epd.models.vision_graphs import VisionGraphs

sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
from test_disaggregation import mixed_requests  # noqa: E402

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

DEVICE = torch.device("cuda:0")
ONE = ((1, 16, 20),)  # grids (t, h, w) in patches: 16x20 is not a whole number of windows
TWO = ((1, 16, 20), (1, 12, 8))


@pytest.fixture(scope="module")
def tower(checkpoints):
    model = build_model(checkpoints["qwen2_5_vl"], parts=frozenset({VISION}), device=DEVICE)
    return model.visual


def patches_of(tower, grids, seed: int) -> torch.Tensor:
    rows = sum(t * h * w for t, h, w in grids)
    gen = torch.Generator(device=DEVICE).manual_seed(seed)
    return torch.randn(rows, tower.cfg.patch_dim, generator=gen, device=DEVICE)


@torch.inference_mode()
def test_replays_equal_the_eager_tower_after_a_shape_was_seen_twice(tower):
    graphs = VisionGraphs(tower, tower.cfg.patch_dim, max_patches=1024, device=DEVICE)
    for call, grids in enumerate([ONE, TWO, ONE, TWO, ONE, TWO]):
        patches = patches_of(tower, grids, seed=call)
        got = graphs(patches, grids).clone()
        assert torch.equal(got, tower(patches, grids)), f"call {call}, grids {grids}"
    assert set(graphs.graphs) == {ONE, TWO}
    assert graphs.replays == 4  # each shape eager once, then captured and replayed twice


@torch.inference_mode()
def test_a_batch_larger_than_the_input_buffer_runs_eagerly(tower):
    graphs = VisionGraphs(tower, tower.cfg.patch_dim, max_patches=320, device=DEVICE)  # ONE: 320 rows
    for call in range(3):
        grids = TWO  # 416 rows
        patches = patches_of(tower, grids, seed=call)
        assert torch.equal(graphs(patches, grids), tower(patches, grids))
    assert graphs.replays == 0 and not graphs.graphs


@torch.inference_mode()
def test_least_recently_used_shape_is_dropped(tower):
    graphs = VisionGraphs(tower, tower.cfg.patch_dim, max_patches=1024, device=DEVICE, max_graphs=1)
    for call, grids in enumerate([ONE, ONE, TWO, TWO, ONE]):
        patches = patches_of(tower, grids, seed=call)
        assert torch.equal(graphs(patches, grids).clone(), tower(patches, grids))
    assert list(graphs.graphs) == [ONE]


def test_encoder_instance_with_vision_graphs_gives_the_aggregated_tokens(checkpoints):
    model, params = str(checkpoints["qwen2_5_vl"]), SamplingParams(temperature=0, max_tokens=8)
    requests = mixed_requests(12, seed=5) * 2  # every image shape twice: the second time replays
    with LLM(model, device="cuda:0") as llm:
        reference = llm.generate(requests, params, use_tqdm=False)
    devices = ",".join(f"cuda:{min(i, torch.cuda.device_count() - 1)}" for i in range(3))
    with LLM(model, layout="1E+1P+1D", devices=devices, vision_cuda_graphs=True) as llm:
        outputs = llm.generate(requests, params, use_tqdm=False)
    for out, ref in zip(outputs, reference):
        assert out.error is None, out.error
        assert out.outputs[0].token_ids == ref.outputs[0].token_ids
