"""Small all-reduces through peer memory (epd.parallel.peer_all_reduce) on two GPUs.

The reference is NCCL's all-reduce of the same tensors on the same ranks: with two ranks each
element is one rounded sum a + b, so both must agree bit for bit (bf16 and fp32). Sizes cross
the peer path's limit (the larger ones go through NCCL), include odd element counts and a view
that starts off the buffer's alignment, and one run replays inside a CUDA graph. (Two processes
on one GPU cannot stand in: torch's symmetric memory refuses ranks that share a device.) The
model-level check, with EPD_PEER_ALL_REDUCE=1: tests/gpu/test_tensor_parallel_cuda.py (tp2
tokens and logprobs = tp1's, with graphs).

    .venv/bin/pytest -q tests/gpu/test_peer_all_reduce.py
"""

from __future__ import annotations

import pytest
import torch
from torch import distributed as dist

from epd.parallel.group import TensorParallelGroup
from epd.parallel.launch import run_on_ranks
from epd.parallel.peer_all_reduce import ENV_SWITCH, MAX_BYTES

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]


@pytest.fixture(autouse=True)
def peer_on(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "1")  # opt-in until measured (spawned ranks inherit it)


# (rows, columns): a decode batch of 1 and 64 at hidden 3584, small counts, one over the limit.
# (3, 7) in bf16 is 42 bytes: not a whole number of the kernel's 4-byte vectors, so NCCL's.
SHAPES = [(1, 3584), (64, 3584), (3, 7), (5, 2), (MAX_BYTES // 4 + 64, 2)]
NCCL_CASES = {f"{SHAPES[-1]} {torch.bfloat16}", f"{SHAPES[-1]} {torch.float32}", f"{(3, 7)} {torch.bfloat16}"}


def _rank_tensor(rank: int, shape: tuple[int, int], dtype: torch.dtype, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed * 10 + rank)
    return torch.randn(shape, generator=gen).to(dtype).cuda()


def _compare(group: TensorParallelGroup) -> list[tuple[str, bool, bool]]:
    """(case, took the peer path, equal to NCCL's sum) for every shape and dtype."""
    out = []
    for i, shape in enumerate(SHAPES):
        for dtype in (torch.bfloat16, torch.float32):
            x = _rank_tensor(group.rank, shape, dtype, i)
            expected = x.clone()
            dist.all_reduce(expected)
            peer = group.peer is not None and group.peer.fits(x)
            got = group.all_reduce(x)
            out.append((f"{shape} {dtype}", peer, torch.equal(got, expected)))
    unaligned = _rank_tensor(group.rank, (1, 3585), torch.bfloat16, 99).view(-1)[1:]
    expected = unaligned.clone()
    dist.all_reduce(expected)
    peer = group.peer.fits(unaligned)
    out.append(("unaligned view", peer, torch.equal(group.all_reduce(unaligned), expected)))
    return out


def _in_graph(group: TensorParallelGroup) -> list[bool]:
    """A graph of three dependent peer all-reduces, replayed on new inputs: NCCL's sums each time."""
    x = torch.zeros(8, 3584, dtype=torch.bfloat16, device="cuda")
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        y = group.all_reduce(x * 2)
        y = group.all_reduce(y + 1)
        y = group.all_reduce(y * 0.5)
    results = []
    for seed in range(3):
        x.copy_(_rank_tensor(group.rank, (8, 3584), torch.bfloat16, seed))
        graph.replay()
        e = x * 2
        dist.all_reduce(e)
        e = e + 1
        dist.all_reduce(e)
        e = e * 0.5
        dist.all_reduce(e)
        results.append(torch.equal(y, e))
    return results


def test_peer_sums_equal_nccl_sums_and_large_ones_use_nccl():
    for rank_results in run_on_ranks(_compare, 2):
        for case, peer, equal in rank_results:
            assert equal, case
            assert peer == (case not in NCCL_CASES and case != "unaligned view"), case


def test_peer_all_reduce_replays_in_a_cuda_graph():
    for rank_results in run_on_ranks(_in_graph, 2):
        assert rank_results == [True, True, True]


def test_switched_off_by_environment(monkeypatch):
    monkeypatch.setenv(ENV_SWITCH, "0")  # spawned ranks inherit it
    assert run_on_ranks(_has_peer, 2) == [False, False]


def _has_peer(group: TensorParallelGroup) -> bool:
    return group.peer is not None
