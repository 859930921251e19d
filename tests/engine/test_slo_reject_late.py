"""Overload: a request that cannot meet its TTFT deadline even if served next is served best-effort
after those that can (default), or refused at once with a retry-after (--reject-late); never
dropped, and counted. The scripted engine with a cost model on a virtual clock: a 400-token prompt
is being prefilled (64 tokens a step, ~8.4 ms each) when two 16-token requests arrive, one with
20 ms to its first token (the prompt ahead alone takes ~50 ms more), one with a second."""

from __future__ import annotations

from functools import partial

from epd import SamplingParams
from epd.clock import VirtualClock
from epd.engine.llm_engine import LLMEngine
from epd.engine.scripted_runner import scripted_parts
from epd.engine.step_estimator import CostModelEstimator
from epd.entrypoints.options import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.inputs.types import ProcessedPrompt
from epd.sim.costs import LinearCosts

COSTS = LinearCosts(step_s=2e-3, token_s=1e-4, sequence_s=0.0)


def engine(checkpoints, **options) -> LLMEngine:
    model = str(checkpoints["qwen2_5_vl"])
    args = EngineArgs(
        model=model,
        block_size=4,
        num_kv_blocks=512,
        max_num_batched_tokens=64,
        max_num_seqs=2,  # one admission at a time beside the long prompt: the order shows
        scheduling_policy="slo",
        **options,
    )
    tokenizer = InputProcessor.from_pretrained(model).tokenizer
    parts = partial(scripted_parts, costs=COSTS)
    return LLMEngine(
        args.engine_config(),
        tokenizer,
        clock=VirtualClock(),
        model_parts=parts,
        step_estimator=CostModelEstimator(COSTS),
    )


def run(eng: LLMEngine) -> dict:
    """The final output of each request."""
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    eng.add_request("long", ProcessedPrompt([300 + t % 80 for t in range(400)], [], []), params)
    eng.step()
    now = eng.clock.now()
    for rid, slo in (("late", 0.02), ("fine", 1.0)):
        prompt = ProcessedPrompt([20 + len(rid)] * 16, [], [])
        eng.add_request(rid, prompt, SamplingParams(temperature=0, max_tokens=3, slo_ttft=slo), now)
    done = {}
    while eng.has_unfinished_requests():
        done.update({o.request_id: o for o in eng.step() if o.finished})
    return done


def test_late_is_served_after_those_that_can_meet_their_deadline(checkpoints):
    eng = engine(checkpoints)
    done = run(eng)
    assert set(done) == {"long", "late", "fine"} and all(o.error is None for o in done.values())
    late, fine = done["late"].metrics, done["fine"].metrics
    assert fine.first_token_time <= fine.arrival_time + 1.0
    assert late.first_token_time > fine.first_token_time, "best-effort: after the one that can make it"
    assert eng.stats()["late_requests_total"] == 1 and eng.stats()["rejected_late_total"] == 0


def test_reject_late_refuses_at_once_with_a_retry_after(checkpoints):
    eng = engine(checkpoints, reject_late=True)
    done = run(eng)
    refused = done["late"]
    assert refused.error is not None and "TTFT deadline" in refused.error
    assert refused.outputs[0].token_ids == [] and refused.outputs[0].finish_reason == "error"
    assert refused.retry_after is not None and refused.retry_after >= 1
    assert refused.metrics.finished_time == refused.metrics.arrival_time, "refused at once"
    assert done["fine"].error is None and len(done["fine"].outputs[0].token_ids) == 3
    assert done["long"].error is None
    assert eng.stats()["rejected_late_total"] == 1 and "late" not in eng.requests
    assert eng.block_manager.num_free_blocks == 512
