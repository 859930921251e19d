"""Scheduler decisions with a real block manager and text-only requests."""

from __future__ import annotations

import pytest

from epd.engine.block_manager import BlockManager
from epd.engine.request import Request, RequestStatus
from epd.engine.scheduler import Scheduler
from epd.inputs.types import ProcessedPrompt
from epd.sampling_params import SamplingParams


def make_request(rid: str, num_tokens: int, first_token: int = 0) -> Request:
    ids = list(range(first_token, first_token + num_tokens))
    return Request(rid, ProcessedPrompt(ids, [], []), SamplingParams(max_tokens=100), merge_size=2)


def run_step(scheduler: Scheduler, sampled_token: int = 7):
    """What the engine does after the model ran: mark computed, append a token."""
    batch = scheduler.schedule()
    for req, n in zip(batch.requests, batch.num_new_tokens):
        req.num_computed_tokens += n
        scheduler.blocks.commit(req.request_id, req.all_token_ids, (), req.num_computed_tokens)
        req.output_token_ids.append(sampled_token)
    return batch


def test_prefills_fill_the_token_budget_then_join_running_decodes():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=25)
    for i in range(3):
        scheduler.add(make_request(f"r{i}", 10, first_token=100 * i))
    first = run_step(scheduler)
    assert [r.request_id for r in first.requests] == ["r0", "r1"] and first.num_new_tokens == [10, 10]
    second = run_step(scheduler)
    assert [r.request_id for r in second.requests] == ["r0", "r1", "r2"]
    assert second.num_new_tokens == [1, 1, 10]  # decodes every step, the new prefill joins them


def test_max_num_seqs_caps_running_requests():
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=2, max_num_batched_tokens=1000)
    for i in range(4):
        scheduler.add(make_request(f"r{i}", 5, first_token=100 * i))
    for _ in range(3):
        assert len(run_step(scheduler)) == 2
    assert len(scheduler.waiting) == 2


def test_out_of_blocks_preempts_the_newest_request():
    # 6 blocks of 4 tokens: two 8-token prompts take 4 blocks; decoding grows both until one must yield.
    scheduler = Scheduler(BlockManager(6, 4), max_num_seqs=8, max_num_batched_tokens=100)
    old, new = make_request("old", 8, 0), make_request("new", 8, 100)
    scheduler.add(old)
    scheduler.add(new)
    preempted = []
    for _ in range(9):
        preempted += run_step(scheduler).preempted
    assert preempted and preempted[0] is new
    assert old.status is RequestStatus.RUNNING and len(old.output_token_ids) == 9
    assert new.num_preemptions >= 1 and scheduler.num_preemptions == len(preempted)


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_preempted_request_is_recomputed_from_all_its_tokens(prefix_caching):
    scheduler = Scheduler(BlockManager(6, 4, prefix_caching), max_num_seqs=8, max_num_batched_tokens=100)
    old, new = make_request("old", 8, 0), make_request("new", 8, 100)
    scheduler.add(old)
    scheduler.add(new)
    while new.num_preemptions == 0:
        run_step(scheduler)
    generated = len(new.output_token_ids)
    assert new.num_computed_tokens == 0 and scheduler.waiting[0] is new
    scheduler.finish(old)
    batch = run_step(scheduler)
    assert batch.requests == [new] and new.num_computed_tokens == 8 + generated
    # Its own blocks, freed at preemption, stay in the prefix cache and spare recomputation.
    recomputed = batch.num_new_tokens[0]
    assert recomputed < 8 + generated if prefix_caching else recomputed == 8 + generated


def test_head_of_line_request_that_does_not_fit_waits_first():
    scheduler = Scheduler(BlockManager(4, 4), max_num_seqs=8, max_num_batched_tokens=100)
    scheduler.add(make_request("small-running", 8, 0))
    run_step(scheduler)
    scheduler.add(make_request("big", 12, 100))  # needs 3 blocks, 2 are free
    scheduler.add(make_request("tiny", 2, 200))
    batch = run_step(scheduler)
    assert [r.request_id for r in batch.requests] == ["small-running"]  # tiny may not overtake big


def test_finish_returns_all_blocks():
    blocks = BlockManager(20, 4, enable_prefix_caching=False)
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=100)
    requests = [make_request(f"r{i}", 6, 10 * i) for i in range(3)]
    for r in requests:
        scheduler.add(r)
    run_step(scheduler)
    run_step(scheduler)
    for r in requests:
        scheduler.finish(r)
    assert blocks.num_free_blocks == 20 and not scheduler.has_unfinished()
