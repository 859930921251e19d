"""Images encoded ahead, beside the steps (epd.engine.encode_ahead), on the CPU: the same tokens
and logprobs as transformers, with preemption and the prefix cache; a request aborted while its
images encode leaves nothing behind; a request whose images fail to encode ends with an error
while the others finish."""

from __future__ import annotations

import asyncio
import dataclasses

import pytest

from epd import LLM, SamplingParams
from epd.entrypoints.async_engine import AsyncEngine, EngineArgs
from epd.testing.images import noise_image
from epd.testing.reference import load_hf_model
from tests.entrypoints.test_llm_vs_hf import GREEDY, assert_matches_hf, mixed_prompts, reference, user_prompt


@pytest.fixture
def hf(checkpoint):
    return load_hf_model(checkpoint)


def _images(llm: LLM, prompts: list) -> int:
    return sum(len(llm.processor.process_prompt(p).images) for p in prompts)


def test_mixed_requests_encoded_ahead_give_transformers_tokens(checkpoint, hf):
    prompts = mixed_prompts(12, seed=11)
    with LLM(str(checkpoint), max_num_seqs=12, encode_ahead=True) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert llm.engine.ahead.num_images_encoded == _images(llm, prompts) > 0  # none in the steps
        assert llm.engine.ahead.pending == 0
        assert_matches_hf(llm, hf, prompts, outputs, GREEDY.max_tokens)


def test_by_default_images_are_encoded_ahead_exactly_where_the_tower_is_on_cuda(checkpoint, hf):
    """On the CPU the tower would take the steps' own cores: encoded in the steps. On CUDA (this
    suite's GPU copy, tests/gpu/test_encode_ahead_cuda.py) it has a stream of its own: ahead."""
    prompts = mixed_prompts(6, seed=3)
    with LLM(str(checkpoint)) as llm:
        on_cuda = llm.engine.runner.embedder.device.type == "cuda"
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert (llm.engine.ahead is not None) == on_cuda
        if on_cuda:
            assert llm.engine.ahead.num_images_encoded == _images(llm, prompts) > 0
        assert_matches_hf(llm, hf, prompts, outputs, GREEDY.max_tokens)


def test_preempted_requests_keep_the_images_encoded_ahead(checkpoint, hf):
    prompts = mixed_prompts(8, seed=5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    with LLM(str(checkpoint), block_size=4, num_kv_blocks=80, max_model_len=320, encode_ahead=True) as llm:
        engine = llm.engine
        engine.ahead.max_images = 100  # all encoded before the first step: every request admitted at once
        processed = [llm.processor.process_prompt(p) for p in prompts]
        for i, prompt in enumerate(processed):
            engine.add_request(f"r{i}", prompt, params)
        while engine.ahead.num_done < sum(1 for p in processed if p.images):
            engine.ahead.wait(1.0)
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update({out.request_id: out for out in engine.step() if out.finished})
        assert engine.scheduler.num_preemptions > 0
        assert engine.ahead.num_images_encoded == _images(llm, prompts)  # not again on recompute
        assert engine.block_manager.num_free_blocks == 80
        for i, prompt in enumerate(processed):
            expected, _ = reference(hf, prompt, params.max_tokens)
            assert outputs[f"r{i}"].outputs[0].token_ids[: len(expected)] == expected


def test_an_image_the_prefix_cache_holds_is_not_encoded_ahead(checkpoint, hf):
    image = noise_image(200, 140, seed=7)
    first = {"prompt": user_prompt("What is in this picture?", 1), "multi_modal_data": {"image": image}}
    again = {
        "prompt": user_prompt("What is in this picture?", 1),
        "multi_modal_data": {"image": image.copy()},
    }
    with LLM(str(checkpoint), block_size=4, encode_ahead=True) as llm:
        [out1] = llm.generate([first], GREEDY, use_tqdm=False)
        assert llm.engine.ahead.num_images_encoded == 1
        [out2] = llm.generate([again], GREEDY, use_tqdm=False)
        assert out2.num_cached_tokens >= llm.processor.process_prompt(again).placeholders[0].end
        assert llm.engine.ahead.num_images_encoded == 1
        assert_matches_hf(llm, hf, [first, again], [out1, out2], GREEDY.max_tokens)


def test_a_request_aborted_while_its_images_encode_leaves_nothing_behind(checkpoint):
    prompts = mixed_prompts(6, seed=2)
    with LLM(str(checkpoint), encode_ahead=True) as llm:
        engine = llm.engine
        for i, prompt in enumerate(prompts):
            engine.add_request(f"r{i}", llm.processor.process_prompt(prompt), GREEDY)
        with_images = [f"r{i}" for i, p in enumerate(prompts) if isinstance(p, dict)]
        for rid in with_images[::2]:
            engine.abort_request(rid)
        finished = set()
        while engine.has_unfinished_requests():
            finished |= {out.request_id for out in engine.step() if out.finished}
        assert finished == {f"r{i}" for i in range(len(prompts))} - set(with_images[::2])
        assert engine.ahead.pending == 0 and not engine.requests
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks


def test_a_request_whose_images_fail_to_encode_ends_with_an_error_and_others_finish(checkpoint):
    good = {
        "prompt": user_prompt("What is in this picture?", 1),
        "multi_modal_data": {"image": noise_image(120, 90, seed=1)},
    }
    with LLM(str(checkpoint), encode_ahead=True) as llm:
        engine = llm.engine
        processed = llm.processor.process_prompt(good)
        image = processed.images[0]
        cut = dataclasses.replace(image, pixel_values=image.pixel_values[:-3])  # rows the grid does not have
        engine.add_request("bad", dataclasses.replace(processed, images=[cut]), GREEDY)
        engine.add_request("good", processed, GREEDY)
        outputs = {}
        while engine.has_unfinished_requests():
            outputs.update({out.request_id: out for out in engine.step() if out.finished})
        assert outputs["bad"].error and "encoding its images failed" in outputs["bad"].error
        assert outputs["bad"].outputs[0].finish_reason == "error"
        assert outputs["good"].error is None and len(outputs["good"].outputs[0].token_ids) > 0
        assert not engine.requests


def test_the_server_engine_loop_serves_concurrent_requests_encoded_ahead(checkpoint, hf):
    """AsyncEngine's loop (the server's): requests come in while it waits for encodes, and each
    gets transformers' tokens."""
    prompts = mixed_prompts(8, seed=13)
    engine = AsyncEngine(EngineArgs(model=str(checkpoint), encode_ahead=True))
    try:
        processed = [engine.processor.process_prompt(p) for p in prompts]

        async def last(i: int):
            outs = [out async for out in engine.generate(processed[i], GREEDY, f"r{i}")]
            return outs[-1]

        async def together():
            return await asyncio.gather(*(last(i) for i in range(len(prompts))))

        outputs = asyncio.run(together())
        assert engine.engine.ahead.num_images_encoded == sum(len(p.images) for p in processed) > 0
    finally:
        engine.shutdown()
    for prompt, out in zip(processed, outputs):
        expected, _ = reference(hf, prompt, GREEDY.max_tokens)
        assert out.outputs[0].token_ids == expected
