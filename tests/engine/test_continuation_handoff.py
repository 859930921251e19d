"""A continuation on a prefill-only engine is handed off at the first token that engine samples.

A continuation (`add_request(..., earlier_token_ids)`: its decode instance died) arrives with
tokens already in its output. A prefill-only engine (one with a hand-off) prefills prompt and
those tokens, samples the next one and hands the request to D there, as for a new request: it
does not decode it itself while the D reserved for it waits. The first token it samples is the
prefill's end in its timeline, whatever came before.
"""

from __future__ import annotations

import pytest
import torch
from engine_runs import run_to_end

from epd import SamplingParams
from epd.engine.llm_engine import LLMEngine
from epd.engine.request import Request
from epd.lifetime import Event

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
PROMPT = {"prompt_token_ids": list(range(10, 40))}


@pytest.fixture(scope="module")
def expected(setup) -> list[int]:
    config, processor = setup
    engine = LLMEngine(config, processor.tokenizer)
    engine.add_request("r", processor.process_prompt(PROMPT), PARAMS)
    return run_to_end(engine)["r"]


def events_of(req: Request) -> list[Event]:
    return [e.event for e in req.metrics.events]


@pytest.mark.parametrize("earlier", [0, 1, 5])
def test_a_prefill_engine_hands_a_continuation_off_at_its_first_sampled_token(setup, expected, earlier):
    config, processor = setup
    handed: list[tuple[Request, torch.Tensor]] = []
    prefill = LLMEngine(config, processor.tokenizer, handoff=lambda req, kv: handed.append((req, kv)))
    prefill.add_request("r", processor.process_prompt(PROMPT), PARAMS, None, expected[:earlier])
    steps = 0
    while prefill.has_unfinished_requests():
        prefill.step()
        steps += 1
    assert steps == 1, "P samples one token, then the request is D's"
    [(req, kv)] = handed
    assert req.output_token_ids == expected[: earlier + 1]
    assert events_of(req).count(Event.PREFILL_END) == 1 and Event.KV_TRANSFER_START in events_of(req)

    # D goes on from P's KV, with the earlier tokens and the one P sampled, to the undisturbed end.
    decode = LLMEngine(config, processor.tokenizer, encode_locally=False)
    first, before = req.output_token_ids[-1], req.output_token_ids[:-1]
    handoff = decode.add_handoff("r", req.prompt, PARAMS, first, None, kv, None, None, before)
    assert run_to_end(decode)["r"] == expected
    assert Event.PREFILL_END not in events_of(handoff), "D samples no first token: P did"
    assert handoff.metrics.first_token_time is None


def test_an_engine_that_decodes_marks_a_continuations_first_token_once(setup, expected):
    """No hand-off (P and D in one): the continuation decodes right here, its first token sampled
    here ending its prefill; the tokens after it do not."""
    config, processor = setup
    engine = LLMEngine(config, processor.tokenizer)
    req = engine.add_request("r", processor.process_prompt(PROMPT), PARAMS, None, expected[:4])
    assert run_to_end(engine)["r"] == expected
    assert events_of(req).count(Event.PREFILL_END) == 1
    assert events_of(req).count(Event.DECODE_START) == 1
    assert req.metrics.first_token_time is not None
