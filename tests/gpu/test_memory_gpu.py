"""gpu_memory_utilization on a CUDA device: the profiled activation peak, and a KV cache sized
by it that leaves the largest step room within the share."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from epd import LLM, SamplingParams
from epd.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from epd.engine.kv_cache import bytes_per_block
from epd.engine.memory import (
    GIB,
    encode_dummy_images,
    free_cached_memory,
    profile_memory,
    resolve_kv_cache_bytes,
    run_dummy_step,
)
from epd.models.layers.attention import PagedAttention
from epd.models.loader import build_model

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

CUDA = torch.device("cuda")
STEP_TOKENS = 4096


def _utilization_for(kv_gib: float) -> float:
    """A share that leaves about `kv_gib` GiB past what this test process already holds (other
    GPU tests' leftovers included), so the test never asks for a large part of the device."""
    total = torch.cuda.get_device_properties(CUDA).total_memory
    return min(1.0, (torch.cuda.memory_reserved(CUDA) + kv_gib * GIB) / total)


def test_activation_peak_is_measured_and_grows_with_the_step(checkpoints):
    model = build_model(checkpoints["qwen2_5_vl"], device=CUDA)
    weights = sum(p.numel() * p.element_size() for p in model.parameters())
    small = profile_memory(model, CUDA, 512)
    large = profile_memory(model, CUDA, STEP_TOKENS)
    assert small.used_after_load >= weights
    assert 0 < small.activation_peak < large.activation_peak
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, PagedAttention))


def test_sized_cache_leaves_the_largest_step_within_the_share(checkpoints):
    checkpoint = checkpoints["qwen2_5_vl"]
    model = build_model(checkpoint, device=CUDA)
    utilization = _utilization_for(2.0)
    config = EngineConfig(
        model=ModelConfig(str(checkpoint), max_model_len=STEP_TOKENS),
        cache=CacheConfig(gpu_memory_utilization=utilization),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=STEP_TOKENS),
        device="cuda",
    )
    kv = resolve_kv_cache_bytes(config, model)
    # Whole bytes: the share was made from a byte count (_utilization_for), and share x total can
    # come back a millionth of a byte short of it (seen: 3328180223.9999995 for 3328180224).
    budget = round(utilization * torch.cuda.get_device_properties(CUDA).total_memory)
    assert 0 < kv < budget
    kv_cache = torch.empty(kv, dtype=torch.uint8, device=CUDA)  # holds the cache's place
    torch.cuda.reset_peak_memory_stats(CUDA)
    run_dummy_step(model, CUDA, STEP_TOKENS, max_num_seqs=16)
    torch.cuda.synchronize(CUDA)
    assert torch.cuda.max_memory_reserved(CUDA) <= budget
    del kv_cache


def test_a_cache_sized_to_encode_ahead_leaves_room_for_the_tower_beside_the_step(checkpoints):
    """Encode-ahead runs the tower on a stream of its own while the steps run: the caching
    allocator keeps each stream's freed blocks for that stream, so their peaks add up."""
    checkpoint = checkpoints["qwen2_5_vl"]
    model = build_model(checkpoint, device=CUDA)
    config = EngineConfig(
        model=ModelConfig(str(checkpoint), max_model_len=STEP_TOKENS),
        cache=CacheConfig(gpu_memory_utilization=_utilization_for(2.0)),
        scheduler=SchedulerConfig(max_num_seqs=16, max_num_batched_tokens=STEP_TOKENS),
        device="cuda",
    )
    assert config.encodes_ahead(CUDA)  # the default on CUDA
    kv = resolve_kv_cache_bytes(config, model)
    assert kv < resolve_kv_cache_bytes(dataclasses.replace(config, encode_ahead=False), model)
    budget = round(config.cache.gpu_memory_utilization * torch.cuda.get_device_properties(CUDA).total_memory)
    kv_cache = torch.empty(kv, dtype=torch.uint8, device=CUDA)
    torch.cuda.reset_peak_memory_stats(CUDA)
    side = torch.cuda.Stream(CUDA)
    with torch.cuda.stream(side):  # the tower's blocks stay with its stream once freed
        encode_dummy_images(model, CUDA, STEP_TOKENS)
    run_dummy_step(model, CUDA, STEP_TOKENS, max_num_seqs=16)
    torch.cuda.synchronize(CUDA)
    assert torch.cuda.max_memory_reserved(CUDA) <= budget
    del kv_cache
    free_cached_memory(CUDA)


@pytest.mark.usefixtures("engines_on_cuda")
def test_llm_sized_by_utilization_serves(checkpoints):
    utilization = _utilization_for(1.0)
    with LLM(
        str(checkpoints["qwen2_5_vl"]), gpu_memory_utilization=utilization, max_model_len=2048, max_num_seqs=8
    ) as llm:
        engine = llm.engine
        kv = engine.block_manager.num_blocks * bytes_per_block(engine.model.config.text, 16, torch.float32)
        total = torch.cuda.get_device_properties(CUDA).total_memory
        assert GIB / 4 < kv < utilization * total  # about 1 GiB: the share less weights and a small step
        out = llm.generate(["hello"], SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) >= 1
