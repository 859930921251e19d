"""KV hand-offs into a decode engine with the real model runner."""

from __future__ import annotations

import torch

from epd import SamplingParams
from epd.engine.llm_engine import LLMEngine
from epd.engine.request import Request
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)


def _run(engine: LLMEngine) -> dict[str, list[int]]:
    done = {}
    while engine.has_unfinished_requests():
        done.update({o.request_id: o.outputs[0].token_ids for o in engine.step() if o.finished})
    return done


def test_a_handoff_whose_kv_the_decode_cache_already_holds_in_full(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    processor = InputProcessor.from_pretrained(model)
    """The same prompt handed off twice: the second time D's prefix cache holds every row, so
    nothing is copied; with the real model runner that empty copy once killed D."""
    config = EngineArgs(model=model, block_size=4, num_kv_blocks=64).engine_config()
    tokenizer = processor.tokenizer
    handed: list[tuple[Request, torch.Tensor]] = []
    prefill = LLMEngine(config, tokenizer, handoff=lambda req, kv: handed.append((req, kv)))
    prompt = processor.process_prompt({"prompt_token_ids": list(range(10, 42))})  # 32: full blocks
    for rid in ("a", "b"):
        prefill.add_request(rid, prompt, PARAMS)
    while prefill.has_unfinished_requests():
        prefill.step()
    decode = LLMEngine(config, tokenizer, encode_locally=False)
    outputs = []
    for req, kv in handed:  # one after the other: the second finds the first's blocks cached
        decode.add_handoff(req.request_id, req.prompt, req.params, req.output_token_ids[0], None, kv)
        outputs.append(_run(decode)[req.request_id])
    assert outputs[0] == outputs[1] and len(outputs[0]) == PARAMS.max_tokens
