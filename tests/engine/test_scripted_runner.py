"""The scripted runner stands in for the model: deterministic, cheap, and sensitive to every KV row,
so the engine's hand-off and prefix-cache paths can be tested on it without weights."""

from __future__ import annotations

import pytest
import torch

from epd import SamplingParams
from epd.engine.llm_engine import LLMEngine
from epd.engine.request import Request
from epd.engine.scripted_runner import ScriptedRunner, scripted_parts
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.testing.images import noise_image

PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>describe"


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def processor(model) -> InputProcessor:
    return InputProcessor.from_pretrained(model)


def _engine(model: str, **kwargs) -> LLMEngine:
    config = EngineArgs(model=model, block_size=4, num_kv_blocks=256).engine_config()
    return LLMEngine(
        config, InputProcessor.from_pretrained(model).tokenizer, model_parts=scripted_parts, **kwargs
    )


def _run(engine: LLMEngine, prompts: dict) -> dict[str, list[int]]:
    for rid, prompt in prompts.items():
        engine.add_request(rid, prompt, PARAMS)
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return done


def _image_prompt(processor: InputProcessor, seed: int):
    return processor.process_prompt(
        {"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": [noise_image(56, 56, seed)]}}
    )


def test_no_weights_are_loaded_and_outputs_are_deterministic(model, processor):
    engine = _engine(model)
    assert engine.model is None and isinstance(engine.runner, ScriptedRunner)
    prompts = {"a": processor.process_prompt("hello world"), "b": _image_prompt(processor, 1)}
    first, second = _run(engine, prompts), _run(_engine(model), prompts)
    assert first == second
    assert all(len(tokens) == PARAMS.max_tokens for tokens in first.values())


def test_outputs_depend_on_image_content_not_only_on_placeholders(model, processor):
    out = _run(_engine(model), {str(s): _image_prompt(processor, s) for s in (1, 2)})
    assert out["1"] != out["2"]
    assert _run(_engine(model), {"again": _image_prompt(processor, 1)})["again"] == out["1"]


def test_prefill_here_decode_there_gives_the_same_tokens(model, processor):
    """P hands the KV to D as in a disaggregated layout; a wrong row would change the tokens."""
    prompts = {
        "t": processor.process_prompt("a longer prompt, to fill several blocks"),
        "i": _image_prompt(processor, 3),
    }
    expected = _run(_engine(model), prompts)
    handed: list[tuple[Request, torch.Tensor]] = []
    prefill = _engine(model, handoff=lambda req, kv: handed.append((req, kv)))
    _run(prefill, prompts)
    decode = _engine(model, encode_locally=False)
    for req, kv in handed:
        decode.add_handoff(req.request_id, req.prompt, req.params, req.output_token_ids[0], None, kv)
    assert _run(decode, {}) == expected
    # The same hand-off with one KV row changed gives other tokens: the runner reads every row.
    req, kv = handed[0]
    kv = kv.clone()
    kv[0, 0, 1] += 1
    corrupted = _engine(model, encode_locally=False)
    corrupted.add_handoff("x", req.prompt, req.params, req.output_token_ids[0], None, kv)
    assert _run(corrupted, {})["x"] != expected[req.request_id]
