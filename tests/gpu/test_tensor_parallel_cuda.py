"""Tensor-parallel instances on GPUs over nccl give the tokens of one GPU (fp32, small model).

The CPU twin (tests/parallel/test_tp_cluster.py) runs the same layouts over gloo; here the ranks'
all-reduces, the KV gathered from a tp2 P and the KV scattered to a tp2 D go through NCCL. The
reference is `1EPD` on one GPU (itself token-exact against transformers: test_llm_vs_hf_cuda).
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from epd import LLM, SamplingParams

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

sys.path.insert(0, str(Path(__file__).parents[1] / "parallel"))
from test_tp_cluster import PROMPTS, assert_same  # noqa: E402

PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)


@pytest.fixture(scope="module")
def model(checkpoints):
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def reference(model):
    with LLM(model, device="cuda:0") as llm:  # Triton kernels, CUDA graphs
        return llm.generate(PROMPTS, PARAMS, use_tqdm=False)


@pytest.mark.parametrize(
    "layout, devices, kv_streaming",
    [
        ("1EPD@tp2", "cuda:0,cuda:1", "request"),
        ("1E+1P@tp2+1D", "cuda:0,cuda:0,cuda:1,cuda:1", "layer"),  # P tp2 -> D tp1
        ("1E+1P+1D@tp2", "cuda:0,cuda:0,cuda:0,cuda:1", "request"),  # P tp1 -> D tp2
    ],
)
def test_tensor_parallel_layouts_match_one_gpu(model, reference, layout, devices, kv_streaming):
    # Triton kernels, eager: CUDA graphs are refused at degree > 1 (they would have to capture
    # the all-reduces).
    with LLM(model, layout=layout, devices=devices, kv_streaming=kv_streaming, cuda_graphs=False) as llm:
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), reference)
