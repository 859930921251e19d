"""Token-exact greedy generation against transformers on the same random-weight checkpoints.

The reference runs each prompt alone through HF `generate` (CPU, fp32, greedy); epd runs
them batched, paged, with prefix caching and preemption. Same tokens is the bar.
"""

from __future__ import annotations

import random

import pytest
import torch

from epd import LLM, SamplingParams
from epd.inputs.types import ProcessedPrompt
from epd.testing.images import noise_image
from epd.testing.reference import assert_logprobs_match, hf_greedy, load_hf_model

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=3)
WORDS = "the image shows a small red car near a tall green tree and two people walking".split()


def user_prompt(text: str, num_images: int = 0) -> str:
    return f"<|im_start|>user\n{IMAGE * num_images}{text}<|im_end|>\n<|im_start|>assistant\n"


def reference(hf, prompt: ProcessedPrompt, max_tokens: int):
    mm = {}
    if prompt.images:
        mm = dict(
            pixel_values=torch.cat([img.pixel_values for img in prompt.images]),
            image_grid_thw=torch.tensor([img.grid_thw for img in prompt.images]),
        )
    return hf_greedy(hf, prompt.prompt_token_ids, max_tokens, **mm)


def assert_matches_hf(llm: LLM, hf, prompts: list, outputs: list, max_tokens: int) -> None:
    for prompt, out in zip(prompts, outputs):
        processed = llm.processor.process_prompt(prompt)
        assert out.prompt_token_ids == processed.prompt_token_ids
        expected, logprobs = reference(hf, processed, max_tokens)
        got = out.outputs[0]
        assert got.token_ids == expected
        if got.logprobs is not None:
            assert_logprobs_match(got.logprobs, expected, logprobs)


@pytest.fixture
def hf(checkpoint):
    return load_hf_model(checkpoint)


def test_text_only(checkpoint, hf):
    prompts = [user_prompt("Describe a cat sleeping on the window."), "The quick brown fox"]
    with LLM(str(checkpoint)) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert_matches_hf(llm, hf, prompts, outputs, GREEDY.max_tokens)


def test_one_image(checkpoint, hf):
    prompts = [
        {
            "prompt": user_prompt("What is in this picture?", 1),
            "multi_modal_data": {"image": noise_image(150, 100, seed=1)},
        }
    ]
    with LLM(str(checkpoint)) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert_matches_hf(llm, hf, prompts, outputs, GREEDY.max_tokens)


def test_several_images_of_different_sizes(checkpoint, hf):
    sizes = [(56, 56), (400, 120), (97, 311), (224, 168)]
    images = [noise_image(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    prompts = [
        {"prompt": user_prompt("Compare these images.", len(images)), "multi_modal_data": {"image": images}}
    ]
    with LLM(str(checkpoint)) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert len(llm.processor.process_prompt(prompts[0]).images) == 4
        assert_matches_hf(llm, hf, prompts, outputs, GREEDY.max_tokens)


def mixed_prompts(n: int, seed: int) -> list:
    """Text-only and 1-3 image prompts of different lengths and image sizes."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 30)))
        k = rng.choice([0, 0, 1, 1, 2, 3])
        images = [
            noise_image(rng.randint(56, 260), rng.randint(56, 260), seed=seed * 100 + i * 5 + j)
            for j in range(k)
        ]
        prompts.append(
            {"prompt": user_prompt(text, k), "multi_modal_data": {"image": images}}
            if k
            else user_prompt(text)
        )
    return prompts


def test_batch_of_16_mixed_requests(checkpoint, hf):
    prompts = mixed_prompts(16, seed=3)
    with LLM(str(checkpoint), max_num_seqs=16) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert_matches_hf(llm, hf, prompts, outputs, GREEDY.max_tokens)


def test_same_image_in_two_requests_hits_prefix_cache(checkpoint, hf):
    image = noise_image(200, 140, seed=7)
    first = {"prompt": user_prompt("What is in this picture?", 1), "multi_modal_data": {"image": image}}
    second = {"prompt": user_prompt("Describe the colours.", 1), "multi_modal_data": {"image": image.copy()}}
    other = {
        "prompt": user_prompt("Describe the colours.", 1),
        "multi_modal_data": {"image": noise_image(200, 140, seed=8)},
    }
    with LLM(str(checkpoint), block_size=4) as llm:
        blocks = llm.engine.block_manager
        [out1] = llm.generate([first], GREEDY, use_tqdm=False)
        hits_before = blocks.prefix_hit_tokens
        [out2] = llm.generate([second], GREEDY, use_tqdm=False)
        image_end = llm.processor.process_prompt(second).placeholders[0].end
        assert out2.num_cached_tokens >= image_end - 4  # the image's blocks came from the cache
        assert blocks.prefix_hit_tokens - hits_before == out2.num_cached_tokens
        # Same placeholder tokens, other pixels: only the text before the image may hit.
        [out3] = llm.generate([other], GREEDY, use_tqdm=False)
        image_start = llm.processor.process_prompt(other).placeholders[0].offset
        assert out3.num_cached_tokens <= image_start
        assert_matches_hf(llm, hf, [first, second, other], [out1, out2, out3], GREEDY.max_tokens)


def test_small_kv_budget_forces_preemption(checkpoint, hf):
    prompts = mixed_prompts(8, seed=5)
    params = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    # Every request admitted at once, images encoded in the steps: encoded ahead (the default on
    # CUDA) they would reach the scheduler as their encodes end, and whether the cache runs short
    # would depend on timing (preemption with encode-ahead: tests/engine/test_encode_ahead.py).
    options = dict(block_size=4, num_kv_blocks=80, max_model_len=320, encode_ahead=False)
    with LLM(str(checkpoint), **options) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.scheduler.num_preemptions > 0
        assert llm.engine.block_manager.num_free_blocks == 80  # everything returned
        for prompt, out in zip(prompts, outputs):
            processed = llm.processor.process_prompt(prompt)
            expected, _ = reference(hf, processed, params.max_tokens)
            # ignore_eos: HF stops at EOS, we go on; the shared prefix must agree.
            assert out.outputs[0].token_ids[: len(expected)] == expected
            assert len(out.outputs[0].token_ids) == params.max_tokens


def test_prompt_larger_than_cache_is_rejected(checkpoint):
    with LLM(str(checkpoint), block_size=4, num_kv_blocks=16, max_model_len=64) as llm:
        with pytest.raises(ValueError, match="maximum is 63"):
            llm.generate(["word " * 80], GREEDY, use_tqdm=False)
        # The engine is still usable afterwards.
        [out] = llm.generate(["hello"], GREEDY, use_tqdm=False)
        assert out.finished
