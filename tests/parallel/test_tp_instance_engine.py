"""An instance's engine on rank 0 over tensor-parallel workers that only execute (epd.parallel
runner and worker): ranks spawned and joined over gloo, tiny Qwen2.5-VL (2 kv heads), greedy, fp32.

The KV crosses the runner whole, as at degree 1: handed off after prefill it is gathered from the
ranks' kv heads (at tp4 two ranks hold each head: one copy is taken), and it equals what one
device computed; handed in (computed on one device) it is scattered to the ranks by kv head, and
decoding from it gives one device's tokens. That is the KV hand-off P tp2 -> D tp1 and the reverse
at the level of one engine (tests/parallel/test_tp_cluster.py runs them between instances)."""

from __future__ import annotations

import pytest
import torch
from tp_runs import HandoffRun, hand_off_and_continue, hand_off_by_ranks

from epd.parallel.launch import run_on_ranks

PROMPTS = [
    {"prompt_token_ids": list(range(10, 41))},  # 31 tokens: crosses blocks of 4
    {"prompt_token_ids": list(range(50, 57))},
]
MAX_TOKENS = 6


@pytest.fixture(scope="module")
def model_dir(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def single_device(model_dir) -> HandoffRun:
    return hand_off_and_continue(None, model_dir, PROMPTS, MAX_TOKENS, None)


@pytest.mark.parametrize("world_size", [2, 4])
def test_kv_gathered_from_the_ranks_and_scattered_to_them_is_one_devices(
    model_dir, single_device, world_size
):
    rank0, *workers = run_on_ranks(
        hand_off_and_continue, world_size, model_dir, PROMPTS, MAX_TOKENS, single_device.handed_off
    )
    assert rank0.handed_off.keys() == single_device.handed_off.keys() == {"0", "1"}
    for rid, (first_token, kv) in single_device.handed_off.items():
        got_token, got_kv = rank0.handed_off[rid]
        assert got_token == first_token
        assert got_kv.shape == kv.shape and kv.shape[-2] == 2  # every kv head
        torch.testing.assert_close(got_kv, kv, atol=1e-5, rtol=0)
    assert rank0.continued.keys() == single_device.continued.keys()
    for rid, (tokens, logprobs) in rank0.continued.items():
        ref_tokens, ref_logprobs = single_device.continued[rid]
        assert tokens == ref_tokens and len(tokens) == MAX_TOKENS
        for position, ref in zip(logprobs, ref_logprobs, strict=True):
            assert position.keys() == ref.keys()
            assert all(abs(position[t] - ref[t]) < 1e-4 for t in ref)
    # Rank 0 drove every worker through the same commands: build, steps, gathers, injections.
    assert len({w.commands_run[0] for w in workers}) == 1 and workers[0].commands_run[0] > MAX_TOKENS


@pytest.mark.parametrize("world_size, kv_streaming", [(2, "request"), (2, "layer"), (4, "request")])
def test_each_rank_sends_its_heads_and_the_pieces_assemble_into_one_devices_kv(
    model_dir, single_device, world_size, kv_streaming
):
    """A P whose ranks send their own kv heads (no gather on rank 0): the pieces, assembled on the
    decode side, are the KV one device hands off; at tp4 two ranks hold each kv head and only the
    first sends it. A hand-off to an address nobody listens at fails on every rank that sends,
    and rank 0 hears of its workers' failures as of its own."""
    rank0, *_ = run_on_ranks(hand_off_by_ranks, world_size, model_dir, PROMPTS, kv_streaming, "1")
    layers = single_device.handed_off["0"][1].shape[0] if kv_streaming == "layer" else 1
    assert rank0.parts_received == layers * 2  # request 0 only: 2 kv pieces (per layer)
    assert rank0.assembled.keys() == {"0"}
    torch.testing.assert_close(rank0.assembled["0"], single_device.handed_off["0"][1], atol=1e-5, rtol=0)
    dead_parts = {f"kvl:1:{part}" for part in range(layers * 2)}
    assert sorted(rank0.failed) == sorted([*dead_parts, "kv:1"])
