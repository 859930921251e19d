"""Rank 0's command channel to its workers (epd.parallel.channel): every command arrives, whole
and in order, at every worker; a rank that dies ends the wait of the others instead of hanging it."""

from __future__ import annotations

import pickle

import torch
from channel_runs import (
    MESSAGES,
    many_messages,
    message,
    rank_zero_dies,
    rank_zero_outlives_worker,
    start_ranks,
    typical_commands,
    worker_that_dies,
    worker_until_closed,
)

from epd.bench.tp_commands import prefill_step
from epd.parallel.channel import dumps
from epd.parallel.launch import run_on_ranks

HANG_GUARD_S = 120  # only so that a broken channel fails the test instead of hanging it


def test_many_messages_arrive_in_order_and_byte_exact_at_every_worker():
    sent, *received = run_on_ranks(many_messages, 3, backend="gloo")
    assert len(sent) == MESSAGES and len({len(message(i)) for i in range(MESSAGES)}) > 5
    assert received == [sent, sent]


def test_the_runners_commands_arrive_equal_a_prefill_with_image_rows_included():
    sent_bytes, got_bytes = run_on_ranks(typical_commands, 2, backend="gloo")
    assert got_bytes == sent_bytes  # the same object graph, tensors' bytes included
    sent, got = [pickle.loads(b) for b in sent_bytes], [pickle.loads(b) for b in got_bytes]
    prefill = got[1]
    assert prefill.mm_shape == (6400, 3584) and prefill.mm_dtype is torch.bfloat16
    assert torch.equal(prefill.step.positions, sent[1].step.positions)
    assert torch.equal(prefill.step.mm_index, sent[1].step.mm_index)
    assert prefill.step.token_ids == sent[1].step.token_ids and len(prefill.step.slots) == 8192
    for name, tensor in sent[3].items():
        assert got[3][name].dtype == tensor.dtype and torch.equal(got[3][name], tensor), name


def test_tensors_travel_as_their_bytes_not_through_torch_save():
    step = prefill_step()
    assert len(dumps(step)) < len(pickle.dumps(step))
    assert pickle.loads(dumps(step)).step.positions.is_contiguous()


def test_workers_end_when_rank_zero_is_killed(tmp_path):
    ranks = start_ranks([rank_zero_dies, worker_until_closed, worker_until_closed], tmp_path)
    (zero, zero_report), *workers = ranks
    assert zero_report.recv() == "sent"
    zero.join(HANG_GUARD_S)
    assert zero.exitcode == -9
    for process, report in workers:
        assert report.poll(HANG_GUARD_S), "a worker still waits for its dead rank 0"
        assert report.recv() == ("closed", [{"i": 0}, {"i": 1}, {"i": 2}])
        process.join(HANG_GUARD_S)
        assert process.exitcode == 0


def test_rank_zero_is_told_when_a_worker_died_instead_of_waiting_on_it(tmp_path):
    (zero, zero_report), (worker, worker_report) = start_ranks(
        [rank_zero_outlives_worker, worker_that_dies], tmp_path
    )
    assert worker_report.recv() == "dying"
    worker.join(HANG_GUARD_S)
    assert worker.exitcode == 3
    assert zero_report.poll(HANG_GUARD_S), "rank 0 still sends to its dead worker"
    outcome, why = zero_report.recv()
    assert outcome == "closed" and "reader 0" in why
    zero.join(HANG_GUARD_S)
