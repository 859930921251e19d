"""The engine's own encode-ahead on the simulator's tower lane (epd.sim.tower_lane), driven step by
step: aborts, prefix-cache hits and the in-step fallback behave as with the engine's thread
(tests/engine/test_encode_ahead.py), now in virtual time."""

from __future__ import annotations

from dataclasses import replace
from functools import partial

import pytest

from epd.engine.llm_engine import LLMEngine
from epd.engine.scripted_runner import scripted_parts
from epd.inputs.tokenizer import Tokenizer
from epd.lifetime import Event
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams
from epd.sim import LinearCosts, Workload, engine_config, make_requests
from epd.sim.gpu_share import SharedGpuClock
from epd.sim.tower_lane import VirtualTower, with_tower_lane
from epd.sim.workload import SimRequest

COSTS = LinearCosts(step_s=0.01, token_s=0.0, sequence_s=0.0, encode_s=0.5, patch_s=0.0)
GREEDY = SamplingParams(temperature=0.0, max_tokens=6, ignore_eos=True)


@pytest.fixture
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


def lane_engine(model: str, ahead: bool = True) -> LLMEngine:
    config = replace(engine_config(model, block_size=4), encode_ahead=ahead)
    parts = with_tower_lane(partial(scripted_parts, costs=COSTS))
    return LLMEngine(config, Tokenizer.from_pretrained(model), clock=SharedGpuClock(0.5), model_parts=parts)


def one_image_requests(model: str, count: int) -> list[SimRequest]:
    """`count` requests of one image each, distinct images, a long text after it (the cache's)."""
    workload = Workload(num_requests=60, seed=4, max_images=1, prompt_tokens=(40, 60))
    requests = make_requests(workload, engine_config(model).model)
    chosen, seen = [], set()
    for r in requests:
        if len(r.prompt.images) == 1 and r.prompt.images[0].content_hash not in seen:
            seen.add(r.prompt.images[0].content_hash)
            chosen.append(r)
    return chosen[:count]


def serve(engine: LLMEngine, requests: dict[str, SimRequest]) -> dict[str, RequestOutput]:
    for rid, r in requests.items():
        engine.add_request(rid, r.prompt, GREEDY)
    return finish(engine)


def finish(engine: LLMEngine) -> dict[str, RequestOutput]:
    outputs = {}
    while engine.has_unfinished_requests():
        outputs.update({out.request_id: out for out in engine.step() if out.finished})
    return outputs


def times(output: RequestOutput, event: Event) -> list[float]:
    return [e.time for e in output.metrics.events if e.event is event]


def test_the_engine_takes_the_simulators_tower_only_where_its_config_encodes_ahead(model):
    assert isinstance(lane_engine(model).ahead.tower, VirtualTower)
    assert lane_engine(model, ahead=False).ahead is None


def test_a_request_aborted_while_its_images_encode_leaves_nothing_and_its_job_runs_out(model):
    a, b = one_image_requests(model, 2)
    engine = lane_engine(model)
    engine.add_request("a", a.prompt, GREEDY)
    engine.add_request("b", b.prompt, GREEDY)
    engine.abort_request("a")  # on the tower's lane already, as it would be on the thread
    outputs = finish(engine)
    assert set(outputs) == {"b"}
    assert engine.ahead.pending == 0 and not engine.requests
    assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    # A job the tower has started runs to its end: b's starts once a's would have ended.
    assert times(outputs["b"], Event.ENCODE_START) == [pytest.approx(COSTS.encode_s)]
    alone = serve(lane_engine(model, ahead=False), {"b": b})
    assert outputs["b"].outputs[0].token_ids == alone["b"].outputs[0].token_ids


def test_an_image_the_prefix_cache_holds_is_not_encoded_ahead(model):
    [request] = one_image_requests(model, 1)
    engine = lane_engine(model)
    first = serve(engine, {"first": request})["first"]
    assert engine.ahead.num_images_encoded == 1
    engine.add_request("again", request.prompt, GREEDY)
    assert engine.ahead.pending == 0 and len(engine.scheduler.waiting) == 1  # scheduled at once
    again = finish(engine)["again"]
    assert again.num_cached_tokens >= request.prompt.placeholders[0].end
    assert engine.ahead.num_images_encoded == 1 and not times(again, Event.ENCODE_START)
    assert again.outputs[0].token_ids == first.outputs[0].token_ids


def test_an_image_not_encoded_ahead_and_then_evicted_is_encoded_in_the_step(model):
    [request] = one_image_requests(model, 1)
    engine = lane_engine(model)
    first = serve(engine, {"first": request})["first"]
    engine.add_request("again", request.prompt, GREEDY)  # the cache holds its image: not ahead
    assert engine.block_manager.reset_prefix_cache()  # and then it does not
    again = finish(engine)["again"]
    assert engine.ahead.num_images_encoded == 1
    [start], [end] = times(again, Event.ENCODE_START), times(again, Event.ENCODE_END)
    assert start == times(again, Event.PREFILL_START)[0]  # inside its first step
    assert end - start == pytest.approx(COSTS.encode_s)  # on the steps' lane, nothing beside it
    assert again.outputs[0].token_ids == first.outputs[0].token_ids
