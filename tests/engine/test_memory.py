"""KV cache sizing from `gpu_memory_utilization`: the arithmetic, its errors, the dummy step that
measures the activation peak (run here on the CPU), and the option's way from the CLI and `LLM`
to the engine config. The CUDA measurements are in tests/gpu/test_memory_gpu.py."""

from __future__ import annotations

import inspect
import math

import pytest
import torch

from epd import LLM
from epd.cli import build_parser, engine_args_from
from epd.config import CacheConfig, EngineConfig, ModelConfig, SchedulerConfig
from epd.engine.memory import GIB, dummy_image_grids, kv_cache_bytes, resolve_kv_cache_bytes, run_dummy_step
from epd.entrypoints.async_engine import EngineArgs
from epd.models.layers.attention import PagedAttention
from epd.models.loader import build_model
from epd.models.qwen2_vl import ALL_PARTS, LANGUAGE

CPU = torch.device("cpu")


# ---- the arithmetic -------------------------------------------------------------------------


def test_kv_cache_gets_the_share_less_weights_and_activations():
    assert kv_cache_bytes(80 * GIB, 0.9, 16 * GIB, 4 * GIB) == 52 * GIB
    assert kv_cache_bytes(80 * GIB, 1.0, 16 * GIB, 0) == 64 * GIB
    assert kv_cache_bytes(100, 0.5, 10, 5) == 35  # whole bytes, the budget rounded down


@pytest.mark.parametrize("used, peak", [(70 * GIB, 2 * GIB), (72 * GIB, 0), (60 * GIB, 12 * GIB)])
def test_no_room_left_names_the_need_and_the_fix(used, peak):
    with pytest.raises(ValueError) as err:
        kv_cache_bytes(80 * GIB, 0.9, used, peak)
    message = str(err.value)
    assert f"need {(used + peak) / GIB:.2f} GiB" in message
    assert "raise gpu_memory_utilization" in message


@pytest.mark.parametrize("utilization", [0, -0.1, 1.01, math.nan])
def test_utilization_outside_zero_one_is_refused(utilization):
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        kv_cache_bytes(80 * GIB, utilization, 0, 0)
    with pytest.raises(ValueError, match=r"gpu_memory_utilization must be in \(0, 1\]"):
        CacheConfig(gpu_memory_utilization=utilization)


def test_cache_config_takes_one_way_of_sizing_with_utilization():
    assert CacheConfig(gpu_memory_utilization=1.0).gpu_memory_utilization == 1.0
    with pytest.raises(ValueError, match="not both"):
        CacheConfig(num_kv_blocks=64, gpu_memory_utilization=0.9)


# ---- resolving an engine's cache ------------------------------------------------------------


def _config(checkpoint, utilization: float | None, device: str = "cpu") -> EngineConfig:
    return EngineConfig(
        model=ModelConfig(str(checkpoint)),
        cache=CacheConfig(kv_cache_memory_bytes=3 << 20, gpu_memory_utilization=utilization),
        device=device,
    )


def test_without_utilization_the_cache_is_kv_cache_memory_bytes(checkpoints):
    checkpoint = checkpoints["qwen2_5_vl"]
    model = build_model(checkpoint)
    assert resolve_kv_cache_bytes(_config(checkpoint, None), model) == 3 << 20


def test_utilization_on_a_cpu_asks_for_cuda(checkpoints):
    checkpoint = checkpoints["qwen2_5_vl"]
    model = build_model(checkpoint)
    with pytest.raises(ValueError, match="CUDA device.*kv_cache_memory_bytes"):
        resolve_kv_cache_bytes(_config(checkpoint, 0.9), model)


def test_llm_with_utilization_on_a_cpu_fails_before_serving(checkpoints):
    with pytest.raises(ValueError, match="CUDA device"):
        LLM(str(checkpoints["qwen2_5_vl"]), device="cpu", gpu_memory_utilization=0.9)


# ---- the dummy step -------------------------------------------------------------------------


@pytest.mark.parametrize("num_tokens", [1, 100, 2304, 2305, 5000])
def test_dummy_images_fill_exactly_the_step_tokens(num_tokens):
    grids = dummy_image_grids(num_tokens, merge=2)
    assert sum(t * h * w for t, h, w in grids) // 4 == num_tokens
    assert all(h % 2 == 0 and w % 2 == 0 for _, h, w in grids)  # whole merge groups


@pytest.mark.parametrize("parts", [ALL_PARTS, frozenset({LANGUAGE})])
def test_dummy_step_runs_and_leaves_no_cache_bound(checkpoints, parts):
    model = build_model(checkpoints["qwen2_5_vl"], parts=parts)
    probs = run_dummy_step(model, CPU, num_tokens=200, max_num_seqs=8, attention_backend="torch_sdpa")
    assert probs.shape == (8, model.config.text.vocab_size) and probs.dtype == torch.float32
    assert torch.allclose(probs.sum(-1), torch.ones(8))
    assert all(m.kv_cache is None for m in model.modules() if isinstance(m, PagedAttention))


def test_dummy_step_encodes_images_only_where_the_model_holds_the_vision_tower(checkpoints, monkeypatch):
    model = build_model(checkpoints["qwen2_5_vl"])
    encoded = []
    original = model.encode_images
    monkeypatch.setattr(model, "encode_images", lambda p, g: encoded.append(g) or original(p, g))
    run_dummy_step(model, CPU, num_tokens=50, attention_backend="torch_sdpa")
    assert encoded == [dummy_image_grids(50, model.config.vision.spatial_merge_size)]


# ---- plumbing -------------------------------------------------------------------------------


def test_engine_args_carry_utilization_to_the_cache_config(checkpoints):
    args = EngineArgs(model=str(checkpoints["qwen2_5_vl"]), gpu_memory_utilization=0.8, block_size=32)
    cache = args.engine_config().cache
    assert cache.gpu_memory_utilization == 0.8 and cache.block_size == 32
    assert cache == CacheConfig(block_size=32, gpu_memory_utilization=0.8)
    assert args.engine_config().scheduler == SchedulerConfig()


def test_cli_flag_parses_and_reaches_engine_args():
    parser = build_parser()
    args = parser.parse_args(["serve", "--model", "m", "--gpu-memory-utilization", "0.85"])
    assert args.gpu_memory_utilization == 0.85
    assert engine_args_from(args, "m").gpu_memory_utilization == 0.85
    default = parser.parse_args(["serve", "--model", "m"]).gpu_memory_utilization
    assert default is None and default == EngineArgs.__dataclass_fields__["gpu_memory_utilization"].default


@pytest.mark.parametrize("text", ["0", "1.5", "-0.2", "lots", "nan"])
def test_cli_refuses_a_utilization_outside_zero_one(text, capsys):
    with pytest.raises(SystemExit) as exit_info:
        build_parser().parse_args(["serve", "--model", "m", "--gpu-memory-utilization", text])
    assert exit_info.value.code == 2
    assert "share of device memory" in capsys.readouterr().err


def test_llm_accepts_the_option():
    assert inspect.signature(LLM).parameters["gpu_memory_utilization"].default is None
