"""Queue policies on the deterministic harness: which requests meet their TTFT deadline under each.

One encoder that encodes one image per batch (a small patch budget) and charges 1 ms a patch, so
its queue is where the time goes: a 6-image request that arrives first holds the encoder for about
0.4 s. FCFS makes the one-image requests behind it miss a 0.2 s TTFT; least slack first serves them
first and the big one still meets its loose deadline.
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from epd.config import EngineConfig
from epd.engine.queue_policy import Urgency, make_queue_policy
from epd.inputs.image_processor import ImageProcessorConfig
from epd.sampling_params import SamplingParams
from epd.sim import ClusterSpec, LinearCosts, SimCluster, SimRequest, SimResult, engine_config, simulate
from epd.sim.workload import Workload, _PromptShaper, image_pool

COSTS = LinearCosts(step_s=1e-3, token_s=1e-6, sequence_s=0.0, encode_s=2e-3, patch_s=1e-3)
PATCHES = 64  # a 112 px image: 8 x 8 patches, 16 tokens; ~66 ms to encode


@pytest.fixture(scope="module")
def engine(checkpoints) -> EngineConfig:
    return engine_config(str(checkpoints["qwen2_5_vl"]))


@pytest.fixture(scope="module")
def images(engine):
    workload = Workload(image_pool=48, image_sides=(112,))
    return image_pool(workload, ImageProcessorConfig.from_pretrained(engine.model.model))


def request(engine, images, rid: str, at: float, image_ids: list[int], **params) -> SimRequest:
    prompt = _PromptShaper(engine.model).prompt([1, 2, 3], [4, 5, 6, 7], [images[i] for i in image_ids])
    return SimRequest(rid, at, prompt, SamplingParams(temperature=0.0, max_tokens=2, **params))


def run(engine: EngineConfig, requests: list[SimRequest], policy: str, max_wait_s: float = 10.0) -> SimResult:
    scheduler = replace(engine.scheduler, scheduling_policy=policy, max_queue_wait_s=max_wait_s)
    engine = replace(engine, scheduler=scheduler)
    cluster = SimCluster(ClusterSpec("1E+1P+1D", engine, costs=COSTS, max_encode_batch_patches=PATCHES))
    for node in cluster.nodes:  # the encoder worker takes its policy from its builder's caller
        if node.core.encode is not None:
            node.core.encode.worker.queue_policy = scheduler.queue_policy()
    result = simulate(cluster, requests)
    assert len(result.outputs) == len(requests) and result.leftovers == []
    return result


def ttft(result: SimResult, rid: str) -> float:
    metrics = result.outputs[rid].metrics
    return metrics.first_token_time - metrics.arrival_time


def met(result: SimResult, requests: list[SimRequest]) -> set[str]:
    return {r.request_id for r in requests if ttft(result, r.request_id) <= r.params.slo_ttft}


@pytest.fixture(scope="module")
def burst(engine, images) -> list[SimRequest]:
    """A 6-image request with a loose deadline, then two 1-image ones with a tight one."""
    return [
        request(engine, images, "big", 0.0, [0, 1, 2, 3, 4, 5], slo_ttft=2.0),
        request(engine, images, "small0", 0.001, [6], slo_ttft=0.2),
        request(engine, images, "small1", 0.002, [7], slo_ttft=0.2),
    ]


def test_fcfs_misses_the_deadlines_that_slo_meets(engine, burst):
    fcfs, slo = run(engine, burst, "fcfs"), run(engine, burst, "slo")
    assert met(fcfs, burst) == {"big"}
    assert met(slo, burst) == {"big", "small0", "small1"}  # every deadline: the best any order can do
    assert ttft(slo, "small0") < ttft(slo, "small1") < ttft(slo, "big")
    assert {rid: o.outputs[0].token_ids for rid, o in fcfs.outputs.items()} == {
        rid: o.outputs[0].token_ids for rid, o in slo.outputs.items()
    }, "the order changes when, never what"


def test_requests_without_a_deadline_go_after_those_with_one(engine, images):
    requests = [
        request(engine, images, "none0", 0.0, [0, 1, 2]),
        request(engine, images, "none1", 0.001, [3]),
        request(engine, images, "tight", 0.002, [4], slo_ttft=0.3),
    ]
    slo = run(engine, requests, "slo")
    assert ttft(slo, "tight") <= 0.3 < ttft(run(engine, requests, "fcfs"), "tight")
    assert slo.outputs["none1"].metrics.first_token_time > slo.outputs["tight"].metrics.first_token_time


def test_priority_serves_lower_values_first(engine, images):
    requests = [
        request(engine, images, "low", 0.0, [0, 1, 2, 3], priority=5),
        request(engine, images, "mid", 0.001, [4], priority=1),
        request(engine, images, "high", 0.002, [5], priority=-1),
    ]
    done = run(engine, requests, "priority").outputs
    first = sorted(done, key=lambda rid: done[rid].metrics.first_token_time)
    assert first == ["high", "mid", "low"]
    fcfs = run(engine, requests, "fcfs").outputs
    assert sorted(fcfs, key=lambda rid: fcfs[rid].metrics.first_token_time) == ["low", "mid", "high"]


def test_no_starvation_under_a_steady_stream_of_higher_priority_work(engine, images):
    """High-priority images arrive faster than the encoder serves them: without the bound the
    low-priority one waits for the whole stream, with it at most max_wait_s and one encode more."""
    stream = [request(engine, images, f"hi{i:02d}", 0.05 * i, [8 + i]) for i in range(40)]
    low = request(engine, images, "low", 0.01, [0, 1], priority=9)
    requests = sorted([*stream, low], key=lambda r: r.arrival_time)
    starved = run(engine, requests, "priority", max_wait_s=100.0)
    bounded = run(engine, requests, "priority", max_wait_s=0.5)
    assert ttft(starved, "low") > 2.0  # it waits for the stream: the bound is what saves it
    assert ttft(bounded, "low") <= 0.5 + 2 * 0.07 + 0.05


def test_the_policy_orders_by_slack_then_arrival():
    policy = make_queue_policy("slo", default_slo_ttft=None, max_wait_s=1.0)
    tight, loose, none = Urgency(0.0, 0.1), Urgency(0.0, 0.5), Urgency(0.0)
    assert policy.key(tight, 0.05) < policy.key(loose, 0.05) < policy.key(none, 0.05)
    assert policy.key(none, 1.5) < policy.key(tight, 0.05), "waited max_wait_s: served next"
    assert make_queue_policy("slo", default_slo_ttft=0.2).deadline(none) == 0.2
    with pytest.raises(ValueError, match="scheduling policy"):
        make_queue_policy("edf")


def test_an_encoder_deadline_leaves_room_for_the_prefill_after_it():
    """Urgency.later_s: what the request still needs after this stage comes off its deadline here."""
    policy = make_queue_policy("slo")
    heavy, light = Urgency(0.0, 0.51, later_s=0.4), Urgency(0.0, 0.50)
    assert policy.deadline(heavy) == pytest.approx(0.11) and policy.deadline(light) == 0.5
    assert policy.key(heavy, 0.0) < policy.key(light, 0.0)


# Prefill priced per token, so that a long prompt's prefill (~0.4 s) dwarfs its encode (~66 ms).
PREFILL_BOUND = LinearCosts(step_s=1e-3, token_s=2e-4, sequence_s=0.0, encode_s=2e-3, patch_s=1e-3)


def test_the_encoder_serves_first_the_request_whose_prefill_still_needs_the_most(engine, images):
    """One encoder, one P. `long` has a 2000-token prompt (0.4 s of prefill) and a TTFT of 0.51 s;
    `short` has 0.50 s and a short prompt. By their TTFT deadlines alone the encoder takes `short`
    first and `long` misses (0.13 s of encodes + 0.4 s of prefill); with the prefill the router
    predicts taken off `long`'s encode deadline, both make it."""
    text = list(range(10, 2010))
    requests = [
        SimRequest("short", 0.0, _PromptShaper(engine.model).prompt([1, 2], [3, 4], [images[0]]),
                   SamplingParams(temperature=0.0, max_tokens=2, slo_ttft=0.50)),
        SimRequest("long", 0.0, _PromptShaper(engine.model).prompt([1, 2], text, [images[1]]),
                   SamplingParams(temperature=0.0, max_tokens=2, slo_ttft=0.51)),
    ]  # fmt: skip

    def run_with(prefill_seconds) -> SimResult:
        scheduler = replace(engine.scheduler, scheduling_policy="slo")
        config = replace(engine, scheduler=scheduler)
        spec = ClusterSpec("1E+1P+1D", config, costs=PREFILL_BOUND, max_encode_batch_patches=PATCHES)
        cluster = SimCluster(spec)
        cluster.router.prefill_seconds = prefill_seconds
        for node in cluster.nodes:
            if node.core.encode is not None:
                node.core.encode.worker.queue_policy = scheduler.queue_policy()
        return simulate(cluster, requests)

    blind = run_with(lambda tokens: 0.0)  # each stage sees only the TTFT deadline
    assert ttft(blind, "short") <= 0.50 < 0.51 < ttft(blind, "long")
    informed = run_with(lambda tokens: tokens * PREFILL_BOUND.token_s)
    assert met(informed, requests) == {"short", "long"}
