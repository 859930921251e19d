"""Encode-ahead in the simulator (epd.sim.tower_lane): the engine's own `EncodeAhead` with its tower
on a lane of the instance's GPU beside the steps (epd.sim.gpu_share), in virtual time.

Scripted compute (epd.engine.scripted_runner): every token depends on the embeddings that reached
the prefill, so equal tokens with and without encode-ahead check the data path. Every time here is
virtual: nothing depends on this machine's speed.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch

from epd.cli import build_parser, simulated_engine_args
from epd.engine.encode_ahead import DEFAULT_MAX_IMAGES_AHEAD
from epd.inputs.image_processor import ImageProcessorConfig
from epd.lifetime import Event
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams
from epd.sim import (
    ClusterSpec,
    LinearCosts,
    SimCluster,
    SimResult,
    Workload,
    engine_config,
    make_requests,
    simulate,
)
from epd.sim.command import simulate_spec
from epd.sim.workload import SimRequest, image_pool

OVERLAP = 0.5  # the speed of steps and tower while both run, in these tests
# A step takes 10 ms whatever it holds; a vision batch 0.5 s: ~50 decode steps.
SLOW_TOWER = LinearCosts(step_s=0.01, token_s=0.0, sequence_s=0.0, encode_s=0.5, patch_s=0.0)
GREEDY_8 = SamplingParams(temperature=0.0, max_tokens=8, ignore_eos=True)


@pytest.fixture
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


def run(model: str, requests: list[SimRequest], ahead: bool, costs=SLOW_TOWER, **engine) -> SimResult:
    config = replace(engine_config(model, **engine), encode_ahead=ahead)
    result = simulate(SimCluster(ClusterSpec("1EPD", config, costs, overlap_speed=OVERLAP)), requests)
    assert result.leftovers == [] and len(result.outputs) == len(requests)
    return result


def first_with(model: str, num_images: int, **changes) -> SimRequest:
    """A request of a seeded workload with `num_images` images, changed as asked."""
    workload = Workload(num_requests=30, seed=5, max_images=1, image_sides=(56,))
    requests = make_requests(workload, engine_config(model).model)
    return replace(next(r for r in requests if len(r.prompt.images) == num_images), **changes)


def token_gaps(result: SimResult, request_id: str) -> list[float]:
    times = [t for t, _ in result.token_times[request_id]]
    return [b - a for a, b in zip(times, times[1:])]


def event_time(output: RequestOutput, event: Event) -> float:
    return next(e.time for e in output.metrics.events if e.event is event)


def decode_beside_an_image(model: str) -> list[SimRequest]:
    """One request decoding 200 tokens from t=0; one with an image arriving at 0.2 s."""
    decoding = first_with(model, 0, params=replace(GREEDY_8, max_tokens=200))
    imaged = first_with(model, 1, arrival_time=0.2, params=GREEDY_8)
    return [replace(decoding, request_id="decoding", arrival_time=0.0), replace(imaged, request_id="imaged")]


def test_a_decode_keeps_stepping_while_the_tower_encodes_ahead(model):
    requests = decode_beside_an_image(model)
    in_steps, ahead = run(model, requests, ahead=False), run(model, requests, ahead=True)
    assert max(token_gaps(in_steps, "decoding")) >= SLOW_TOWER.encode_s  # one step held the whole tower
    beside = SLOW_TOWER.step_s / OVERLAP  # a step slowed by the tower beside it, no more
    assert max(token_gaps(ahead, "decoding")) == pytest.approx(beside)
    # The decode ran throughout, so the tower ran slowed all along.
    imaged = ahead.outputs["imaged"]
    span = event_time(imaged, Event.ENCODE_END) - event_time(imaged, Event.ENCODE_START)
    assert span == pytest.approx(SLOW_TOWER.encode_s / OVERLAP)
    assert event_time(imaged, Event.ENCODE_END) <= event_time(imaged, Event.PREFILL_START)
    for rid in ("decoding", "imaged"):
        assert ahead.outputs[rid].outputs[0].token_ids == in_steps.outputs[rid].outputs[0].token_ids


def encodes_and_prefills(output: RequestOutput) -> tuple[list[float], list[float], float]:
    events = output.metrics.events
    starts = [e.time for e in events if e.event is Event.ENCODE_START]
    ends = [e.time for e in events if e.event is Event.ENCODE_END]
    return starts, ends, event_time(output, Event.PREFILL_START)


def test_the_same_tokens_whether_images_are_encoded_ahead_or_in_the_steps(model):
    workload = Workload(num_requests=40, rate_per_s=20, seed=9, max_images=3, output_tokens=(4, 16))
    requests = make_requests(workload, engine_config(model).model)
    costs = LinearCosts(encode_s=0.02)
    in_steps, ahead = run(model, requests, False, costs), run(model, requests, True, costs)
    for rid, out in ahead.outputs.items():
        assert out.outputs[0].token_ids == in_steps.outputs[rid].outputs[0].token_ids
    encoded = 0
    for rid, out in ahead.outputs.items():
        _, ends, prefill = encodes_and_prefills(out)
        assert all(end <= prefill for end in ends)  # before the scheduler saw the request
        _, ends, prefill = encodes_and_prefills(in_steps.outputs[rid])
        assert all(end > prefill for end in ends)  # inside its first step
        encoded += len(ends)
    assert encoded >= 20


def most_images_ahead(outputs: dict[str, RequestOutput]) -> int:
    """The most images at once whose encoding had started and whose request's prefill had not."""
    spans = []
    for out in outputs.values():
        starts, _, prefill = encodes_and_prefills(out)
        spans += [(start, prefill) for start in starts]
    return max(sum(start <= t < prefill for start, prefill in spans) for t, _ in spans)


def test_images_ahead_stay_within_the_bound_while_requests_wait_to_be_scheduled(model):
    """Twenty one-image requests at once on an engine that runs one request at a time: without
    the bound, every image would be encoded long before its request could start."""
    one = first_with(model, 1, params=GREEDY_8)
    distinct = image_pool(
        Workload(image_pool=20, seed=2, image_sides=(56,)), ImageProcessorConfig.from_pretrained(model)
    )
    requests = [
        replace(one, request_id=f"r{i}", arrival_time=0.0, prompt=replace(one.prompt, images=[img]))
        for i, img in enumerate(distinct)
    ]
    fast_tower = LinearCosts(step_s=0.01, token_s=0.0, sequence_s=0.0, encode_s=0.001, patch_s=0.0)
    result = run(model, requests, True, fast_tower, max_num_seqs=1)
    assert most_images_ahead(result.outputs) == DEFAULT_MAX_IMAGES_AHEAD


# ---- epd simulate -----------------------------------------------------------------------------

# 224 px images (256 patches) take 76 ms to encode; a step 5 ms.
HEAVY_TOWER = "step_s=0.005,token_s=1e-6,sequence_s=0,encode_s=0.05,patch_s=1e-4"
TOWER_S = 0.05 + 256 * 1e-4


@pytest.mark.parametrize(
    "flags",
    [
        [],
        ["--device", "cuda:0"],
        ["--device", "cuda:0", "--no-encode-ahead"],
        ["--encode-ahead"],
        ["--layout", "2EPD", "--devices", "cuda:0,cuda:1"],
        ["--layout", "2EPD", "--devices", "cpu,cuda:1"],
    ],
)
def test_simulate_encodes_ahead_where_serve_would(flags):
    args = build_parser().parse_args(["simulate", *flags])
    engine_args = simulated_engine_args(args)
    served = engine_args.engine_config()  # epd serve's config for the same flags
    devices = (engine_args.devices or engine_args.device).split(",")
    expected = all(served.encodes_ahead(torch.device(d)) for d in devices)
    assert simulate_spec(args, engine_args).cluster.engine.encode_ahead == expected
    assert expected == (flags in (["--device", "cuda:0"], ["--encode-ahead"]) or "cuda:0,cuda:1" in flags)


def test_simulate_with_no_encode_ahead_models_the_tower_in_the_steps(simulate, quick):
    flags = ["--layout", "1EPD", "--rate", "4", "--costs", HEAVY_TOWER, *quick, "--output-tokens", "32"]
    on_cpu = simulate(*flags, name="cpu")
    in_steps = simulate(*flags, "--device", "cuda:0", "--no-encode-ahead", name="steps")
    ahead = simulate(*flags, "--device", "cuda:0", name="ahead")
    assert [doc["simulation"]["encode_ahead"]["on"] for doc in (on_cpu, in_steps, ahead)] == [
        False,
        False,
        True,
    ]
    digest = [doc["simulation"]["runs"][0]["log_digest"] for doc in (on_cpu, in_steps, ahead)]
    assert digest[0] == digest[1] != digest[2]  # 1EPD moves nothing between instances: no connector
    itl = [doc["runs"][0]["summary"]["itl"]["p99"] for doc in (in_steps, ahead)]
    assert itl[0] > TOWER_S > itl[1]  # decodes no longer wait for whole towers
