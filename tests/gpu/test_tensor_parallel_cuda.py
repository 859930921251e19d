"""Tensor-parallel instances on GPUs over nccl give the tokens of one GPU (fp32, small model).

The CPU twin (tests/parallel/test_tp_cluster.py) runs the same layouts over gloo; here the ranks'
all-reduces, the KV gathered from a tp2 P and the KV scattered to a tp2 D go through NCCL. The
reference is `1EPD` on one GPU (itself token-exact against transformers: test_llm_vs_hf_cuda).

CUDA graphs at tp2: every rank captures its share of the decode step, the all-reduces included,
and replays the graph of the same padded size at each step; the tokens are tp1's (with graphs)
and tp2's eager ones, at decode batches that fill a graph and one that is padded up.
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
from tp_runs import DecodeRun, Generated, decode_in_batches  # noqa: E402

from epd.parallel.launch import run_on_ranks  # noqa: E402

PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)


@pytest.fixture(scope="module")
def model(checkpoints):
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def reference(model):
    with LLM(model, device="cuda:0") as llm:  # Triton kernels, CUDA graphs
        return llm.generate(PROMPTS, PARAMS, use_tqdm=False)


@pytest.mark.parametrize("cuda_graphs", [False, True], ids=["eager", "graphs"])
@pytest.mark.parametrize(
    "layout, devices, kv_streaming",
    [
        ("1EPD@tp2", "cuda:0,cuda:1", "request"),
        ("1E+1P@tp2+1D", "cuda:0,cuda:0,cuda:1,cuda:1", "layer"),  # P tp2 -> D tp1
        ("1E+1P+1D@tp2", "cuda:0,cuda:0,cuda:0,cuda:1", "request"),  # P tp1 -> D tp2
    ],
)
def test_tensor_parallel_layouts_match_one_gpu(model, reference, layout, devices, kv_streaming, cuda_graphs):
    # Triton kernels; decode steps eager or replayed as graphs on every rank.
    with LLM(
        model, layout=layout, devices=devices, kv_streaming=kv_streaming, cuda_graphs=cuda_graphs
    ) as llm:
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), reference)


BATCHES = [1, 3, 8]  # decode batch sizes: 1 and 8 fill their graphs, 3 runs in the graph of 4
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def tp1_graphs(model) -> DecodeRun:
    return run_on_ranks(decode_in_batches, 1, model, True, BATCHES, MAX_TOKENS)[0]


def test_tp2_decode_graphs_give_the_tokens_of_tp1_graphs_and_of_tp2_eager(model, tp1_graphs):
    rank0, worker = run_on_ranks(decode_in_batches, 2, model, True, BATCHES, MAX_TOKENS)
    eager, eager_worker = run_on_ranks(decode_in_batches, 2, model, False, BATCHES, MAX_TOKENS)
    for size in BATCHES:
        assert len(rank0.generated[size]) == size
        assert_same_generated(rank0.generated[size], tp1_graphs.generated[size])
        assert_same_generated(rank0.generated[size], eager.generated[size])
    # Every decode step replayed a graph, the same padded size on both ranks, as at tp1.
    decode_steps = MAX_TOKENS - 1  # the first token comes from the prefill
    assert (
        rank0.replays
        == worker.replays
        == tp1_graphs.replays
        == {1: decode_steps, 4: decode_steps, 8: decode_steps}
    )
    assert not eager.replays and not eager_worker.replays


def assert_same_generated(got: Generated, want: Generated) -> None:
    assert got.keys() == want.keys()
    for rid, (tokens, logprobs) in got.items():
        want_tokens, want_logprobs = want[rid]
        assert tokens == want_tokens and len(tokens) == MAX_TOKENS, rid
        for position, ref in zip(logprobs, want_logprobs, strict=True):
            assert position.keys() == ref.keys(), rid
            assert all(abs(position[t] - ref[t]) < 1e-4 for t in ref), rid


def test_hand_offs_past_the_staging_buffer_wait_for_room_on_every_rank(model, reference):
    """P tp2 -> D tp1 over cuda_ipc, each rank's staging buffer holding a few hand-offs of this
    model's prompts (a rank's piece: ~5-15 KB): twenty go through, so every rank got its regions
    back from D's acks (a worker that never read them failed from the fifth 9k-token hand-off on)."""
    with LLM(
        model,
        layout="1E+1P@tp2+1D",
        devices="cuda:0,cuda:0,cuda:1,cuda:1",
        kv_streaming="request",
        transfer_staging_bytes=48 << 10,
    ) as llm:
        outputs = llm.generate(PROMPTS * 10, PARAMS, use_tqdm=False)
    assert_same(outputs, reference * 10)
