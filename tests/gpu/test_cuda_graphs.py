"""Decode steps replayed from CUDA graphs give the same tokens and logprobs as eager steps."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest
import torch

from epd import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
    pytest.mark.usefixtures("engines_on_cuda"),
]


def _mixed_prompts(n: int, seed: int) -> list:
    path = Path(__file__).parents[1] / "entrypoints" / "test_llm_vs_hf.py"
    spec = importlib.util.spec_from_file_location("_llm_vs_hf_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.mixed_prompts(n, seed)


def test_graph_decode_matches_eager(checkpoint):
    prompts = _mixed_prompts(13, seed=11)
    # Different lengths, so the batch shrinks through many padded sizes (13 -> 16, 7 -> 8, ...).
    params = [
        SamplingParams(temperature=0, max_tokens=4 + 2 * i, logprobs=4, ignore_eos=True) for i in range(13)
    ]
    with LLM(str(checkpoint), max_num_seqs=16, enable_prefix_caching=False) as llm:
        runner = llm.engine.runner
        assert runner.backend.name == "triton" and runner.graphs is not None
        graphed = llm.generate(prompts, params, use_tqdm=False)
        assert sorted(runner.graphs.graphs) == [1, 2, 4, 8, 16]  # captured at start, up to max_num_seqs
        runner.graphs = None
        eager = llm.generate(prompts, params, use_tqdm=False)
    for g, e in zip(graphed, eager):
        assert g.outputs[0].token_ids == e.outputs[0].token_ids
        for pos_g, pos_e in zip(g.outputs[0].logprobs, e.outputs[0].logprobs):
            assert pos_g.keys() == pos_e.keys()
            for token, lp in pos_g.items():
                assert abs(lp.logprob - pos_e[token].logprob) < 1e-5
