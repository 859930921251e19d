"""Tensor-parallel generation of the tiny Qwen2.5-VL checkpoint's language model (4 heads, 2 kv
heads): one full engine per rank (its scheduler, runner, paged KV cache of its kv heads, sampler),
ranks spawned and joined over gloo. Greedy, fp32: the same tokens as one device and as
transformers, logprobs within 1e-4 (the row-parallel sums add in another order than one matmul).
tp4 has fewer kv heads than ranks: pairs of ranks hold the same kv head. At tp2 the LM head is
split by vocabulary rows (654 divides by 2; not by 4: replicated there), its own rows or, tied,
the embedding's."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
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


@pytest.fixture(scope="module")
def tied_model_dir(model_dir, tmp_path_factory) -> str:
    """The checkpoint with its LM head tied to the token embedding (as Qwen2.5-VL-3B ships)."""
    out = tmp_path_factory.mktemp("tied")
    shutil.copytree(model_dir, out, dirs_exist_ok=True)
    config = json.loads((out / "config.json").read_text())
    config["tie_word_embeddings"] = config["text_config"]["tie_word_embeddings"] = True
    (out / "config.json").write_text(json.dumps(config))
    weights = out / "model.safetensors"
    tensors = {name: t for name, t in load_file(weights).items() if not name.endswith("lm_head.weight")}
    save_file(tensors, weights, metadata={"format": "pt"})  # no head of its own: the embedding's
    return str(out)


def test_a_vocabulary_split_head_tied_to_the_embedding_generates_what_one_device_does(tied_model_dir):
    expected = generate(None, tied_model_dir, PROMPTS, MAX_TOKENS).generated
    hf = load_hf_model(tied_model_dir)
    reference = [hf_greedy(hf, p["prompt_token_ids"], MAX_TOKENS) for p in PROMPTS]
    _assert_same_as_transformers(expected, reference)
    for run in run_on_ranks(generate, 2, tied_model_dir, PROMPTS, MAX_TOKENS):
        _assert_same_as_one_device(run.generated, expected)
