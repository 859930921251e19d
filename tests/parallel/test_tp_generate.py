"""Tensor-parallel generation of the tiny Qwen2.5-VL checkpoint's language model (4 heads, 2 kv
heads): one full engine per rank (its scheduler, runner, paged KV cache of its kv heads, sampler),
ranks spawned and joined over gloo. Greedy, fp32: the same tokens as one device and as
transformers, logprobs within 1e-4 (the row-parallel sums add in another order than one matmul).
tp4 has fewer kv heads than ranks: pairs of ranks hold the same kv head."""

from __future__ import annotations

import pytest
import torch
from tp_runs import Generated, generate

from epd.parallel.launch import run_on_ranks
from epd.testing.reference import hf_greedy, load_hf_model

PROMPTS = [
    {"prompt_token_ids": list(range(10, 41))},  # 31 tokens: prefill and decodes cross blocks of 4
    {"prompt_token_ids": list(range(50, 57))},  # batched with it: another length, other blocks
]
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def model_dir(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def single_device(model_dir):
    run = generate(None, model_dir, PROMPTS, MAX_TOKENS)
    assert run.kv_cache_shape[-2] == 2
    return run.generated


@pytest.fixture(scope="module")
def transformers_greedy(model_dir) -> list[tuple[list[int], list[torch.Tensor]]]:
    hf = load_hf_model(model_dir)
    return [hf_greedy(hf, p["prompt_token_ids"], MAX_TOKENS) for p in PROMPTS]


def _assert_same_as_one_device(got: Generated, expected: Generated) -> None:
    assert got.keys() == expected.keys()
    for rid, (tokens, logprobs) in got.items():
        ref_tokens, ref_logprobs = expected[rid]
        assert tokens == ref_tokens, rid
        for position, ref in zip(logprobs, ref_logprobs, strict=True):
            assert position.keys() == ref.keys()
            assert all(abs(position[t] - ref[t]) < 1e-4 for t in ref), rid


def _assert_same_as_transformers(got: Generated, reference: list) -> None:
    for rid, (expected, hf_logprobs) in enumerate(reference):
        tokens, logprobs = got[str(rid)]
        assert tokens == expected
        for position, token, ref in zip(logprobs, tokens, hf_logprobs, strict=True):
            assert abs(position[token] - ref[token].item()) < 1e-4
            assert set(torch.topk(ref, 3).indices.tolist()) <= set(position)


@pytest.mark.parametrize("world_size", [2, 4])
def test_tensor_parallel_engines_generate_what_one_device_and_transformers_do(
    model_dir, single_device, transformers_greedy, world_size
):
    runs = run_on_ranks(generate, world_size, model_dir, PROMPTS, MAX_TOKENS)
    assert len(runs) == world_size
    for run in runs:  # every rank computed the same logits, so sampled the same tokens
        assert run.kv_cache_shape[-2] == 1  # its own kv head only
        _assert_same_as_one_device(run.generated, single_device)
        _assert_same_as_transformers(run.generated, transformers_greedy)
