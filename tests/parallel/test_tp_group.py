"""The tensor-parallel group's collectives across spawned ranks (gloo on the CPU), and how a
failing rank is reported."""

from __future__ import annotations

import pytest
import torch
from tp_runs import collectives, fail_on_rank_one

from epd.parallel.group import TensorParallelGroup
from epd.parallel.launch import run_on_ranks


def test_collectives_give_every_rank_the_same_result():
    results = run_on_ranks(collectives, 2)
    for got in results:
        assert torch.equal(got["sum"], torch.tensor([3.0, 6.0]))
        assert got["min"].item() == 9
        assert torch.equal(got["gather"], torch.tensor([[0.0, 1.0], [0.0, 1.0]]))
        assert got["broadcast"] == {"step": 7}


def test_a_failing_rank_is_reported_and_the_others_stopped():
    with pytest.raises(RuntimeError, match="rank one gives up"):
        run_on_ranks(fail_on_rank_one, 2)


def test_a_rank_outside_its_group_is_refused():
    with pytest.raises(ValueError, match="outside a group of 2"):
        TensorParallelGroup(2, 2)
