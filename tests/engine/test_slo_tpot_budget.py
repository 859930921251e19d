"""The TPOT budget: while requests decode, a step's prefill tokens stop where its predicted time would
pass the tightest TPOT target among them. Timing changes, tokens do not: on the scripted engine
(cost model on a virtual clock, so step times are the cost model's, not this machine's) and on the
real tiny model against transformers."""

from __future__ import annotations

import importlib.util
from dataclasses import replace
from functools import partial
from pathlib import Path

import pytest

from epd import LLM, SamplingParams
from epd.clock import VirtualClock
from epd.engine.llm_engine import LLMEngine
from epd.engine.scheduler import ScheduledBatch
from epd.engine.scripted_runner import scripted_parts
from epd.engine.step_estimator import CostModelEstimator, OnlineEstimator, Seq
from epd.entrypoints.options import EngineArgs
from epd.inputs.types import ProcessedPrompt
from epd.sim.costs import LinearCosts
from epd.testing.reference import load_hf_model

COSTS = LinearCosts(step_s=2e-3, token_s=1e-4, sequence_s=1e-4)
BUDGET = 64
TPOT = 5e-3  # 3 decodes alone: 2.6 ms; a full 64-token step beside them: 9.0 ms


def scripted_engine(checkpoints, **options) -> tuple[LLMEngine, VirtualClock]:
    args = EngineArgs(model=str(checkpoints["qwen2_5_vl"]), block_size=4, num_kv_blocks=512, **options)
    clock = VirtualClock()
    parts = partial(scripted_parts, costs=COSTS)
    engine = LLMEngine(
        args.engine_config(),
        _tokenizer(checkpoints),
        clock=clock,
        model_parts=parts,
        step_estimator=CostModelEstimator(COSTS),
    )
    return engine, clock


def _tokenizer(checkpoints):
    from epd.inputs.processor import InputProcessor

    return InputProcessor.from_pretrained(str(checkpoints["qwen2_5_vl"])).tokenizer


def run(
    engine: LLMEngine, clock: VirtualClock, slo_tpot: float | None
) -> tuple[dict, list[tuple[bool, float]]]:
    """Three short requests decode; a 300-token prompt arrives once they do. Returns the tokens of
    each and, per step, (whether requests were decoding in it, its seconds)."""
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, slo_tpot=slo_tpot)
    for i in range(3):
        engine.add_request(f"short{i}", ProcessedPrompt([50 + i] * 6, [], []), params)
    steps, done = [], {}
    while engine.has_unfinished_requests():
        if engine.num_steps == 2:
            long = ProcessedPrompt([200 + t % 90 for t in range(300)], [], [])
            engine.add_request("long", long, replace(params, max_tokens=4))
        decoding = any(r.output_token_ids for r in engine.scheduler.running)
        started = clock.now()
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
        steps.append((decoding, clock.now() - started))
    return done, steps


def test_steps_beside_decodes_stay_within_the_tightest_tpot(checkpoints):
    capped, capped_steps = run(*scripted_engine(checkpoints, max_num_batched_tokens=BUDGET), TPOT)
    free, free_steps = run(*scripted_engine(checkpoints, max_num_batched_tokens=BUDGET), None)
    assert capped == free and set(capped) == {"short0", "short1", "short2", "long"}, "tokens do not change"
    assert max(s for decoding, s in free_steps if decoding) > TPOT  # without a target: over it
    assert all(s <= TPOT + 1e-12 for decoding, s in capped_steps if decoding)
    decodes_alone = COSTS.step_s + 3 * (COSTS.token_s + COSTS.sequence_s)
    assert any(s > decodes_alone for decoding, s in capped_steps if decoding), "chunks were cut, not stopped"


def test_the_server_default_and_the_tightest_request_set_the_target(checkpoints):
    engine, clock = scripted_engine(checkpoints, max_num_batched_tokens=BUDGET, slo_tpot=1.0)
    done, steps = run(engine, clock, None)  # every request takes --slo-tpot: 1 s, never binding
    assert max(s for decoding, s in steps if decoding) > TPOT
    engine, clock = scripted_engine(checkpoints, max_num_batched_tokens=BUDGET, slo_tpot=1.0)
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True, slo_tpot=TPOT)
    engine.add_request("tight", ProcessedPrompt([7] * 5, [], []), params)
    _, tight_steps = run(engine, clock, None)
    assert all(s <= TPOT + 1e-12 for decoding, s in tight_steps[1:30] if decoding)


def test_online_estimator_fits_the_steps_it_saw():
    estimator = OnlineEstimator()
    shapes = [[Seq(n, 0, n)] * k for n, k in ((1, 1), (30, 1), (5, 4), (64, 2), (1, 8))]
    assert estimator.step_seconds(shapes[0]) is None, "nothing seen: no estimate"
    for shape in shapes:
        batch = ScheduledBatch(list(shape), [s.new for s in shape])
        estimator.observe(shape, COSTS.step_seconds(batch))
    probe = [Seq(17, 0, 17), Seq(1, 9, 9)]
    assert estimator.step_seconds(probe) == pytest.approx(
        COSTS.step_s + 18 * COSTS.token_s + 2 * COSTS.sequence_s
    )


def _suite():
    """The transformers comparison of tests/entrypoints/test_llm_vs_hf.py (test modules are not a package)."""
    path = Path(__file__).parents[1] / "entrypoints" / "test_llm_vs_hf.py"
    spec = importlib.util.spec_from_file_location("_llm_vs_hf_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_capped_steps_are_token_exact_against_transformers(checkpoints):
    """The real model, chunks cut by the TPOT budget (predicted by COSTS, so the cut does not depend
    on this machine's speed) beside decodes: the greedy tokens are transformers'."""
    suite, model = _suite(), str(checkpoints["qwen2_5_vl"])
    prompts = suite.mixed_prompts(4, seed=3)
    params = SamplingParams(temperature=0, max_tokens=8, slo_tpot=4e-3)  # beside 1 decode: 17 tokens at most
    with LLM(model, block_size=4, max_num_batched_tokens=32, max_num_seqs=4) as llm:
        llm.engine.scheduler.estimator = CostModelEstimator(COSTS)
        sizes = []
        schedule = llm.engine.scheduler.schedule

        def logged() -> ScheduledBatch:
            decoding = any(r.output_token_ids for r in llm.engine.scheduler.running)
            batch = schedule()
            sizes.append((decoding, batch.total_tokens))
            return batch

        llm.engine.scheduler.schedule = logged
        outputs = llm.generate(prompts, params, use_tqdm=False)
        suite.assert_matches_hf(llm, load_hf_model(model), prompts, outputs, params.max_tokens)
    beside = [n for decoding, n in sizes if decoding]
    assert beside and max(beside) < 32 and any(n > 4 for n in beside)  # cut, yet chunks rode along
