"""Running requests through an engine with async scheduling off and on, and comparing the outputs
(tests/engine/test_async_scheduling*.py)."""

from __future__ import annotations

import random
from collections.abc import Callable
from dataclasses import replace

import pytest

from epd import SamplingParams
from epd.engine.llm_engine import LLMEngine

# Called after every step with the engine and the step's outputs: adds or aborts requests.
Hook = Callable[[LLMEngine, list], None]


def prompt(first: int, length: int) -> dict:
    return {"prompt_token_ids": [(first + 7 * i) % 500 + 10 for i in range(length)]}


def make_engine(setup, async_on: bool, **options) -> LLMEngine:
    """The fixture's engine; `options`: num_kv_blocks, max_model_len, or SchedulerConfig fields."""
    config, processor = setup
    cache = {k: v for k, v in options.items() if k == "num_kv_blocks"}
    model = {k: v for k, v in options.items() if k == "max_model_len"}
    scheduler = {k: v for k, v in options.items() if k not in cache and k not in model}
    config = replace(
        config,
        model=replace(config.model, **model),
        cache=replace(config.cache, **cache),
        scheduler=replace(config.scheduler, **scheduler),
        async_scheduling=async_on,
    )
    return LLMEngine(config, processor.tokenizer)


def outputs(
    setup, async_on: bool, requests: dict, hook: Hook | None = None, **config
) -> tuple[dict, LLMEngine]:
    """Run `requests` (id -> (prompt, params)) to the end: each one's final output, and the engine."""
    _, processor = setup
    engine = make_engine(setup, async_on, **config)
    for rid, (text, params) in requests.items():
        engine.add_request(rid, processor.process_prompt(text), params)
    done = {}
    while engine.has_unfinished_requests():
        step_outputs = engine.step()
        for out in step_outputs:
            if out.finished:
                done[out.request_id] = _comparable(out)
        if hook is not None:
            hook(engine, step_outputs)
    return done, engine


def _comparable(out) -> tuple:
    c = out.outputs[0]
    return (c.token_ids, c.logprobs, c.finish_reason, c.stop_reason, c.text)


def assert_all_blocks_free(engine: LLMEngine) -> None:
    blocks = engine.block_manager
    blocks.check_invariants()
    assert blocks.num_free_blocks == blocks.num_blocks
    assert not engine.requests and not engine.scheduler.running and not engine.scheduler.waiting


def both(
    setup,
    requests: dict,
    hook_of: Callable[[], Hook | None] = lambda: None,
    exact: bool = True,
    tolerance: float = 1e-5,
    **config,
) -> tuple:
    """(sync outputs, async outputs, async engine): checked equal (`exact`: bit for bit; else to
    `tolerance` in logprobs, see tests/engine/test_async_scheduling.py) and leak-free here."""
    sync, sync_engine = outputs(setup, False, requests, hook_of(), **config)
    overlapped, async_engine = outputs(setup, True, requests, hook_of(), **config)
    if exact:
        assert overlapped == sync
    else:
        assert_same_but_rounding(sync, overlapped, tolerance)
    assert_all_blocks_free(sync_engine)
    assert_all_blocks_free(async_engine)
    return sync, overlapped, async_engine


def assert_same_but_rounding(sync: dict, overlapped: dict, tolerance: float = 1e-5) -> None:
    assert overlapped.keys() == sync.keys()
    for rid, (tokens, logprobs, *reasons_and_text) in sync.items():
        assert overlapped[rid][0] == tokens, rid
        assert overlapped[rid][2:] == tuple(reasons_and_text), rid
        if logprobs is None:
            assert overlapped[rid][1] is None
            continue
        for mine, theirs in zip(overlapped[rid][1], logprobs, strict=True):
            assert mine.keys() == theirs.keys(), rid
            for token, lp in theirs.items():
                assert mine[token].logprob == pytest.approx(lp.logprob, rel=tolerance, abs=tolerance / 10), (
                    rid
                )
                assert (mine[token].rank, mine[token].decoded_token) == (lp.rank, lp.decoded_token)


def reference_tokens(setup, text: dict, length: int = 24) -> list[int]:
    """A greedy run's tokens: the stop tokens and strings below are picked from them."""
    params = SamplingParams(temperature=0, max_tokens=length, ignore_eos=True)
    done, _ = outputs(setup, False, {"ref": (text, params)})
    return done["ref"][0]


def overlapped_steps(engine: LLMEngine) -> float:
    return engine.stats()["overlapped_steps_total"]


def random_mix(rng: random.Random) -> tuple[dict, dict, dict]:
    """(requests, arrivals: id -> (step, request), aborts: id -> tokens shown) of every kind."""
    requests = {}
    for i in range(rng.randint(3, 9)):
        kind = rng.choice(["greedy", "seeded", "eos", "stop", "unseeded"])
        options = dict(max_tokens=rng.choice([1, 2, 3, 7, 20, 35]), logprobs=rng.choice([None, 0, 2]))
        if kind == "greedy":
            options |= dict(temperature=0, ignore_eos=True)
        elif kind == "seeded":
            options |= dict(temperature=0.8, seed=rng.randint(0, 99), ignore_eos=rng.random() < 0.5)
        elif kind == "eos":
            options |= dict(temperature=0)
        elif kind == "stop":
            options |= dict(temperature=0, stop_token_ids=[rng.randint(10, 600) for _ in range(30)])
        else:
            options |= dict(temperature=1.0)
        requests[f"r{i}"] = (prompt(rng.randint(0, 400), rng.randint(3, 40)), SamplingParams(**options))
    arrivals = {
        f"late{i}": (
            rng.randint(1, 15),
            (prompt(rng.randint(0, 400), rng.randint(3, 60)), SamplingParams(temperature=0, max_tokens=20)),
        )
        for i in range(rng.randint(0, 3))
    }
    aborts = {rid: rng.randint(1, 10) for rid in requests if rng.random() < 0.2}
    return requests, arrivals, aborts


def run_random_mix(setup, seed: int, tolerance: float = 1e-5) -> None:
    """`random_mix(seed)` with async scheduling off and on, with a random cache size, budget and
    batch limit: the same outputs (to rounding) and no leak."""
    _, processor = setup
    rng = random.Random(seed)
    requests, arrivals, aborts = random_mix(rng)

    def hook_of() -> Hook:
        steps = [0]

        def hook(engine: LLMEngine, step_outputs: list) -> None:
            steps[0] += 1
            for rid, (step, (text, params)) in arrivals.items():
                if step == steps[0]:
                    engine.add_request(rid, processor.process_prompt(text), params)
            for out in step_outputs:
                if not out.finished and len(out.outputs[0].token_ids) == aborts.get(out.request_id):
                    engine.abort_request(out.request_id)

        return hook

    config = dict(
        num_kv_blocks=rng.choice([40, 60, 256]),
        max_num_batched_tokens=rng.choice([8, 16, 64, 2048]),
        max_num_seqs=rng.choice([2, 4, 16]),
    )
    both(setup, requests, hook_of, exact=False, tolerance=tolerance, **config)
