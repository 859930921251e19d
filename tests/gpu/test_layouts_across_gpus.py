"""Disaggregated layouts across GPUs give the aggregated engine's tokens (fp32, small model).

The reference is `1EPD` on one GPU (itself token-exact against transformers: test_llm_vs_hf_cuda);
the layouts put E, P and D on different GPUs (two instances share one when only two are present),
with embeddings and KV moving through the cuda_ipc connector that `transfer="auto"` picks there,
KV sent layer by layer and whole.
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

sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
from test_disaggregation import mixed_requests  # noqa: E402

PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=2)


def _devices(n: int) -> str:
    """n instances over the GPUs present, in order, the last GPU taking any extra instances."""
    count = torch.cuda.device_count()
    return ",".join(f"cuda:{min(i, count - 1)}" for i in range(n))


@pytest.fixture(scope="module")
def model(checkpoints):
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def requests():
    return mixed_requests(16, seed=3)


@pytest.fixture(scope="module")
def reference(model, requests):
    with LLM(model, device="cuda:0") as llm:
        return llm.generate(requests, PARAMS, use_tqdm=False)


def assert_same(outputs, reference) -> None:
    for out, ref in zip(outputs, reference):
        assert out.error is None, out.error
        got, want = out.outputs[0], ref.outputs[0]
        assert got.token_ids == want.token_ids
        assert got.text == want.text and got.finish_reason == want.finish_reason
        for position, ref_position in zip(got.logprobs, want.logprobs):
            assert position.keys() == ref_position.keys()
            for token, lp in position.items():
                # fp32, but P and D batch differently from 1EPD: cuBLAS may pick other kernels.
                assert lp.logprob == pytest.approx(ref_position[token].logprob, abs=1e-4)


@pytest.mark.parametrize(
    ("layout", "kv_streaming"),
    [("1E+1P+1D", "layer"), ("1E+1P+1D", "request"), ("2E+1P+1D", "layer"), ("1EP+1D", "layer")],
)
def test_layout_across_gpus_matches_one_gpu(model, requests, reference, layout, kv_streaming):
    n = sum(int(group[0]) for group in layout.split("+"))
    with LLM(model, layout=layout, devices=_devices(n), kv_streaming=kv_streaming) as llm:
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
    assert_same(outputs, reference)


def test_seeded_sampling_across_gpus_matches_one_gpu(model, requests):
    # The generator state crosses devices with the KV (CUDA generators, CPU state bytes).
    seeded = [SamplingParams(temperature=0.9, max_tokens=8, seed=100 + i) for i in range(8)]
    with LLM(model, device="cuda:0") as llm:
        want = llm.generate(requests[:8], seeded, use_tqdm=False)
    with LLM(model, layout="1E+1P+1D", devices=_devices(3)) as llm:
        got = llm.generate(requests[:8], seeded, use_tqdm=False)
    assert [o.outputs[0].token_ids for o in got] == [o.outputs[0].token_ids for o in want]
