"""The engine reads time only through its Clock: on a virtual clock every timestamp is virtual."""

from __future__ import annotations

import pytest

from epd import SamplingParams
from epd.clock import VirtualClock
from epd.engine.llm_engine import LLMEngine
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.lifetime import Event
from epd.testing.images import noise_image


def test_virtual_clock_moves_only_when_advanced():
    clock = VirtualClock(5.0)
    assert clock.now() == clock.monotonic() == 5.0
    clock.advance(1.5)
    clock.advance_to(10.0)
    assert clock.now() == 10.0
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(9.0)


def test_engine_timestamps_come_from_its_clock(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    processor = InputProcessor.from_pretrained(model)
    clock = VirtualClock(1000.0)
    engine = LLMEngine(
        EngineArgs(model=model, block_size=4).engine_config(), processor.tokenizer, clock=clock
    )
    prompt = processor.process_prompt(
        {
            "prompt": "<|vision_start|><|image_pad|><|vision_end|>what?",
            "multi_modal_data": {"image": [noise_image(56, 56, seed=1)]},
        }
    )
    engine.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))
    step_times = []
    while engine.has_unfinished_requests():
        clock.advance(2.0)  # each step "happens" 2 s after the last
        step_times.append(clock.now())
        [out] = [o for o in engine.step() if o.request_id == "r"] or [None]
    metrics = out.metrics
    assert metrics.arrival_time == 1000.0
    assert metrics.first_token_time == step_times[0]
    assert metrics.finished_time == step_times[-1]
    times = {e.event: e.time for e in metrics.events}
    assert times[Event.PREFILL_QUEUED] == 1000.0
    assert times[Event.ENCODE_START] == times[Event.ENCODE_END] == times[Event.PREFILL_START] == step_times[0]
    assert times[Event.FINISHED] == step_times[-1]
    assert engine.step_seconds == 0.0  # no virtual time passes inside a step


def test_a_virtual_clock_advanced_to_a_time_reads_exactly_that_time():
    clock = VirtualClock(0.10244964654520394)
    clock.advance_to(1.193242358568683)  # now + (when - now) is one rounding step above it
    assert clock.now() == 1.193242358568683
    with pytest.raises(ValueError, match="cannot go back"):
        clock.advance_to(1.0)
