"""A seeded request continued elsewhere draws what it would have drawn undisturbed.

When its decode instance dies, a request is prefilled again on another instance with its prompt and
the tokens it had (`add_request(..., earlier_token_ids)`), or handed off there with them
(`add_handoff`): no generator state survives. Its draws depend only on (seed, position)
(epd.engine.sampler.draw_seed), so the continuation must give the undisturbed run's tokens.
"""

from __future__ import annotations

import pytest
import torch
from engine_runs import run_to_end

from epd import SamplingParams
from epd.engine.llm_engine import LLMEngine
from epd.engine.request import Request
from epd.engine.sampler import draw_seed

PARAMS = SamplingParams(temperature=0.8, seed=1234, max_tokens=24, ignore_eos=True)
PROMPT = {"prompt_token_ids": list(range(10, 40))}


def undisturbed(setup, params: SamplingParams = PARAMS) -> list[int]:
    config, processor = setup
    engine = LLMEngine(config, processor.tokenizer)
    engine.add_request("r", processor.process_prompt(PROMPT), params)
    return run_to_end(engine)["r"]


def test_the_undisturbed_run_samples_and_repeats(setup):
    tokens = undisturbed(setup)
    assert len(set(tokens)) > 3, "temperature 0.8 must sample, or the tests below prove nothing"
    assert undisturbed(setup) == tokens
    other = SamplingParams(temperature=0.8, seed=4321, max_tokens=24, ignore_eos=True)
    assert undisturbed(setup, other) != tokens


@pytest.mark.parametrize("earlier", [1, 7, 23])
def test_a_continuation_with_earlier_tokens_draws_the_undisturbed_tokens(setup, earlier):
    config, processor = setup
    expected = undisturbed(setup)
    engine = LLMEngine(config, processor.tokenizer)
    engine.add_request("busy", processor.process_prompt({"prompt_token_ids": [5] * 9}), PARAMS)
    prompt = processor.process_prompt(PROMPT)
    engine.add_request("r", prompt, PARAMS, None, expected[:earlier])
    assert run_to_end(engine)["r"] == expected


def test_a_continuation_handed_off_without_generator_state_draws_the_undisturbed_tokens(setup):
    """P prefills prompt + earlier tokens and samples the next; D goes on from P's KV. Nothing of
    P's generator travels: D's draws follow from the request's token count alone."""
    config, processor = setup
    expected = undisturbed(setup)
    handed: list[tuple[Request, torch.Tensor]] = []
    prefill = LLMEngine(config, processor.tokenizer, handoff=lambda req, kv: handed.append((req, kv)))
    prompt = processor.process_prompt(PROMPT)
    prefill.add_request("r", prompt, PARAMS)  # a first attempt: P samples token 0, hands off
    run_to_end(prefill)
    [(req, kv)] = handed
    assert req.output_token_ids == expected[:1]
    decode = LLMEngine(config, processor.tokenizer, encode_locally=False)
    decode.add_handoff("r", req.prompt, PARAMS, req.output_token_ids[0], None, kv)
    assert run_to_end(decode)["r"] == expected


def test_draw_seeds_differ_by_seed_and_position_and_accept_every_torch_seed():
    seeds = {draw_seed(s, n) for s in (0, 1, 2, -1, 2**40, -(2**63)) for n in range(50)}
    assert len(seeds) == 300
    for seed in seeds:
        torch.Generator().manual_seed(seed)  # in torch's range
    assert draw_seed(-1, 3) == draw_seed(2**64 - 1, 3)  # the same 64 bits: the same stream
