"""The TPOT budget's margin (epd.engine.scheduler.TPOT_MARGIN): a step's time is predicted, and the
prediction is off both ways. On the scripted engine (virtual clock) whose steps take the cost model's
time give or take up to `NOISE` (seeded: the same steps every run), steps filled up to the target
itself run over it about half the time, so requests miss their TPOT by a little; aimed below it, they
meet it. Tokens do not change."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from functools import partial

from epd import SamplingParams
from epd.clock import VirtualClock
from epd.engine.llm_engine import LLMEngine
from epd.engine.scheduler import TPOT_MARGIN, ScheduledBatch
from epd.engine.scripted_runner import scripted_parts
from epd.engine.step_estimator import CostModelEstimator
from epd.entrypoints.options import EngineArgs
from epd.inputs.types import ProcessedPrompt
from epd.sim.costs import LinearCosts

COSTS = LinearCosts(step_s=2e-3, token_s=1e-4, sequence_s=1e-4)  # what the scheduler predicts with
NOISE = 0.08  # a step's true time: the prediction times a factor within 1 +- NOISE
TPOT = 5e-3  # a few decodes alone: ~3 ms; beside a 64-token chunk: ~9 ms, so the budget cuts chunks
NUM_DECODERS, NUM_PROMPTS, PROMPT_TOKENS, OUTPUT_TOKENS = 4, 8, 300, 8


@dataclass
class NoisyCosts:
    """The truth the virtual clock moves by: `costs` with a seeded error on every step."""

    costs: LinearCosts
    rng: random.Random

    def step_seconds(self, batch: ScheduledBatch) -> float:
        return self.costs.step_seconds(batch) * self.rng.uniform(1 - NOISE, 1 + NOISE)

    def encode_seconds(self, grids: Sequence[tuple[int, int, int]]) -> float:
        return self.costs.encode_seconds(grids)


def serve(checkpoints, tpot_margin: float | None) -> tuple[dict[str, list[int]], dict[str, float]]:
    """Short prompts decode while a backlog of long ones is prefilled in chunks beside them (every
    step full up to the TPOT budget). `tpot_margin`: None, the scheduler's default. Returns each
    request's tokens and its TPOT on the virtual clock."""
    args = EngineArgs(
        model=str(checkpoints["qwen2_5_vl"]), block_size=4, num_kv_blocks=2048, max_num_batched_tokens=64
    )
    clock = VirtualClock()
    truth = NoisyCosts(COSTS, random.Random(0))
    engine = LLMEngine(
        args.engine_config(),
        _tokenizer(checkpoints),
        clock=clock,
        model_parts=partial(scripted_parts, costs=truth),
        step_estimator=CostModelEstimator(COSTS),
    )
    if tpot_margin is not None:
        engine.scheduler.tpot_margin = tpot_margin
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True, slo_tpot=TPOT)
    for i in range(NUM_DECODERS):
        engine.add_request(f"short{i}", ProcessedPrompt([50 + i] * 6, [], []), params)
    for i in range(NUM_PROMPTS):
        prompt = ProcessedPrompt([100 + (7 * i + t) % 150 for t in range(PROMPT_TOKENS)], [], [])
        engine.add_request(f"long{i}", prompt, params)
    token_times: dict[str, list[float]] = {}
    done = {}
    while engine.has_unfinished_requests():
        for out in engine.step():
            times = token_times.setdefault(out.request_id, [])
            times += [clock.now()] * (len(out.outputs[0].token_ids) - len(times))
            if out.finished:
                done[out.request_id] = out.outputs[0].token_ids
    tpots = {rid: (t[-1] - t[0]) / (len(t) - 1) for rid, t in token_times.items()}
    return done, tpots


def _tokenizer(checkpoints):
    from epd.inputs.processor import InputProcessor

    return InputProcessor.from_pretrained(str(checkpoints["qwen2_5_vl"])).tokenizer


def attainment(tpots: dict[str, float]) -> float:
    return sum(t <= TPOT for t in tpots.values()) / len(tpots)


def test_a_margin_below_the_target_meets_the_tpot_that_aiming_at_it_misses(checkpoints):
    at_target, at_target_tpots = serve(checkpoints, tpot_margin=1.0)
    margin, margin_tpots = serve(checkpoints, tpot_margin=None)  # the default: TPOT_MARGIN
    assert margin == at_target and len(margin) == NUM_DECODERS + NUM_PROMPTS, "tokens do not change"
    # Aimed at the line, the errors put a good share of the requests over it, each by a little.
    assert attainment(at_target_tpots) <= 0.8
    assert max(at_target_tpots.values()) < TPOT * (1 + NOISE)
    assert attainment(margin_tpots) == 1.0
    # The margin is paid in prefill tokens per step, not in more: the requests still run close to it.
    assert max(margin_tpots.values()) > TPOT * TPOT_MARGIN * (1 - NOISE)
