"""The slo policy against every service order, on the engine with a cost model on a virtual clock.

A small case: 5 text requests of different lengths and TTFT deadlines, all waiting at t = 0, on one
engine that prefills in chunks of a 32-token budget and charges `COSTS` per step (no per-sequence
term: a request's first token then depends only on the tokens served before it, the setting where
serving by deadline is provably best: Jackson's rule). Every order is run on the same engine with
the priority policy (priority = place in the order), so "which deadlines can be met together" is
measured, not computed by a model of the engine.

What is asserted, per case: let `alone` be the requests whose deadline is met when served first.
If some order meets every deadline in `alone`, the slo policy meets every one of them too. (Requests
not in `alone` cannot be met by any order: slo sees them late at once and serves them after the
others, so they cost the others nothing.) Cases are seeded draws; the test checks that the draws
include cases where FCFS fails and cases with hopeless requests, so it is not vacuous.
"""

from __future__ import annotations

import itertools
import random
from dataclasses import dataclass, replace
from functools import partial

import pytest

from epd import SamplingParams
from epd.clock import VirtualClock
from epd.config import EngineConfig
from epd.engine.llm_engine import LLMEngine
from epd.engine.scripted_runner import scripted_parts
from epd.engine.step_estimator import CostModelEstimator
from epd.entrypoints.options import EngineArgs
from epd.inputs.types import ProcessedPrompt
from epd.sim.costs import LinearCosts

COSTS = LinearCosts(step_s=2e-3, token_s=1e-4, sequence_s=0.0)
BUDGET = 32
NUM_REQUESTS = 5
NUM_CASES = 10


@dataclass(frozen=True)
class Job:
    name: str
    tokens: int
    slo_ttft: float


@pytest.fixture(scope="module")
def base(checkpoints, setup) -> tuple[EngineConfig, object]:
    config, processor = setup
    config = EngineArgs(
        model=str(checkpoints["qwen2_5_vl"]),
        block_size=4,
        num_kv_blocks=512,
        max_num_batched_tokens=BUDGET,
        enable_prefix_caching=False,
    ).engine_config()
    return config, processor.tokenizer


def engine(base, policy: str) -> LLMEngine:
    config, tokenizer = base
    config = replace(
        config, scheduler=replace(config.scheduler, scheduling_policy=policy, max_queue_wait_s=1e9)
    )
    return LLMEngine(
        config,
        tokenizer,
        clock=VirtualClock(),
        model_parts=partial(scripted_parts, costs=COSTS),
        step_estimator=CostModelEstimator(COSTS),
    )


def ttfts(base, jobs: list[Job], policy: str, order: tuple[int, ...] | None = None) -> dict[str, float]:
    """Each job's TTFT on a fresh engine; `order` (priority policy): job indices, served first to last."""
    eng = engine(base, policy)
    for i, job in enumerate(jobs):
        priority = order.index(i) if order is not None else 0
        ids = [100 + 7 * i + t % 50 for t in range(job.tokens)]  # distinct per job, inside the vocabulary
        params = SamplingParams(temperature=0, max_tokens=1, slo_ttft=job.slo_ttft, priority=priority)
        eng.add_request(job.name, ProcessedPrompt(ids, [], []), params, arrival_time=0.0)
    firsts = {}
    while eng.has_unfinished_requests():
        for out in eng.step():
            firsts.setdefault(out.request_id, out.metrics.first_token_time)
    return firsts


def met(jobs: list[Job], firsts: dict[str, float]) -> frozenset[str]:
    return frozenset(j.name for j in jobs if firsts[j.name] <= j.slo_ttft)


def draw_case(rng: random.Random) -> list[Job]:
    """Lengths 8-120 tokens; deadlines from 10% to 110% of the time all of them take together."""
    tokens = [rng.randint(8, 120) for _ in range(NUM_REQUESTS)]
    total = sum(tokens) * COSTS.token_s + (sum(tokens) / BUDGET + NUM_REQUESTS) * COSTS.step_s
    return [Job(f"r{i}", n, round(rng.uniform(0.1, 1.1) * total, 6)) for i, n in enumerate(tokens)]


def test_slo_meets_every_deadline_some_order_meets(base):
    rng = random.Random(20)
    fcfs_failed = hopeless = 0
    for _ in range(NUM_CASES):
        jobs = draw_case(rng)
        orders = {
            order: met(jobs, ttfts(base, jobs, "priority", order))
            for order in itertools.permutations(range(NUM_REQUESTS))
        }
        alone = frozenset(jobs[order[0]].name for order, ok in orders.items() if jobs[order[0]].name in ok)
        feasible = any(alone <= ok for ok in orders.values())
        slo = met(jobs, ttfts(base, jobs, "slo"))
        if feasible:
            assert alone <= slo, f"{jobs}: some order meets {sorted(alone)}, slo met only {sorted(slo)}"
            fcfs_failed += not alone <= met(jobs, ttfts(base, jobs, "fcfs"))
        hopeless += len(alone) < NUM_REQUESTS
        assert slo <= alone, "nothing meets a deadline that no order meets"
    assert fcfs_failed >= 2 and hopeless >= 2, (fcfs_failed, hopeless)


def test_least_slack_would_miss_what_deadline_order_meets(base):
    """Why the policy orders by deadline (queue_policy docstring): A's slack is smaller, B's deadline
    earlier; serving A first (least slack) makes B miss, serving by deadline meets both."""
    a_alone = 96 * COSTS.token_s + 3 * COSTS.step_s
    b_alone = 16 * COSTS.token_s + 1 * COSTS.step_s
    jobs = [Job("a", 96, a_alone + b_alone + 1e-4), Job("b", 16, b_alone + 0.5 * a_alone)]
    assert jobs[0].slo_ttft - a_alone < jobs[1].slo_ttft - b_alone  # A has less slack
    assert met(jobs, ttfts(base, jobs, "priority", (0, 1))) == {"a"}  # least slack first: B misses
    assert met(jobs, ttfts(base, jobs, "slo")) == {"a", "b"}
