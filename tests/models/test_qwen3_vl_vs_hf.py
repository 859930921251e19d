"""Qwen3-VL through epd's offline `LLM`, token-exact against transformers, in three layouts.

The reference runs each prompt alone through HF `generate` (CPU, fp32, greedy; computed once
and shared by the layouts); epd runs them batched and paged, aggregated (1EPD) or with the
image embeddings (main + deepstack levels, one tensor per image) sent from encoder instances
to a prefill instance and the KV on to a decode instance.
"""

from __future__ import annotations

import random

import pytest
import torch

from epd import LLM, SamplingParams
from epd.testing.images import noise_image
from epd.testing.reference import assert_logprobs_match, hf_greedy, load_hf_model

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=3)
WORDS = "the image shows a small red car near a tall green tree and two people walking".split()
LAYOUTS = ["1EPD", "1E+1P+1D", "2E+1P+1D"]


def user_prompt(text: str, num_images: int = 0) -> str:
    return f"<|im_start|>user\n{IMAGE * num_images}{text}<|im_end|>\n<|im_start|>assistant\n"


def with_images(text: str, images: list) -> dict | str:
    if not images:
        return user_prompt(text)
    return {"prompt": user_prompt(text, len(images)), "multi_modal_data": {"image": images}}


def mixed_prompts(n: int, seed: int) -> list:
    """Text-only and 1-3 image prompts of different lengths and image sizes."""
    rng = random.Random(seed)
    prompts = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
        sizes = [(rng.randint(40, 300), rng.randint(40, 300)) for _ in range(rng.choice([0, 1, 2, 3]))]
        images = [noise_image(w, h, seed=seed * 100 + i * 5 + j) for j, (w, h) in enumerate(sizes)]
        prompts.append(with_images(text, images))
    return prompts


# Square, wide, tall, and one larger than the 8 x 8 learned position grid in both directions.
SIZES = [(64, 64), (400, 120), (97, 311), (300, 260)]
SCENARIOS = {
    "text_only": [user_prompt("Describe a cat sleeping on the window."), "The quick brown fox"],
    "one_image": [with_images("What is in this picture?", [noise_image(150, 100, seed=1)])],
    "several_images": [
        with_images(
            "Compare these images.",
            [noise_image(w, h, seed=10 + i) for i, (w, h) in enumerate(SIZES)],
        )
    ],
    "mixed_batch": mixed_prompts(6, seed=3),
}


@pytest.fixture(scope="module")
def hf(qwen3_checkpoint):
    return load_hf_model(qwen3_checkpoint)


@pytest.fixture(scope="module")
def references(hf) -> dict:
    """(scenario, index) -> HF's (tokens, logprobs), filled as the tests need them."""
    return {}


@pytest.fixture(scope="module", params=LAYOUTS)
def llm(request, qwen3_checkpoint):
    with LLM(
        str(qwen3_checkpoint), layout=request.param, max_num_seqs=8, max_model_len=1024, num_kv_blocks=512
    ) as llm:
        yield llm


def reference(hf, prompt) -> tuple[list[int], list[torch.Tensor]]:
    mm = {}
    if prompt.images:
        mm = dict(
            pixel_values=torch.cat([img.pixel_values for img in prompt.images]),
            image_grid_thw=torch.tensor([img.grid_thw for img in prompt.images]),
        )  # hf_greedy adds mm_token_type_ids (image rows) for transformers' M-RoPE
    return hf_greedy(hf, prompt.prompt_token_ids, GREEDY.max_tokens, **mm)


def check_scenario(llm: LLM, hf, references: dict, scenario: str) -> None:
    prompts = SCENARIOS[scenario]
    outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
    for i, (prompt, out) in enumerate(zip(prompts, outputs)):
        processed = llm.processor.process_prompt(prompt)
        assert out.prompt_token_ids == processed.prompt_token_ids
        if (scenario, i) not in references:
            references[scenario, i] = reference(hf, processed)
        expected, logprobs = references[scenario, i]
        got = out.outputs[0]
        assert got.token_ids == expected, f"prompt {i}"
        assert_logprobs_match(got.logprobs, expected, logprobs)


def test_chunked_prefill_and_prefix_cache(qwen3_checkpoint, hf, references):
    """Chunks of 16 tokens end inside images: each chunk gets the deepstack levels of exactly its
    image rows. The second run hits the prefix cache, images included. (Defined first so that it
    runs before any multi-instance layout starts: those processes would share the two cores.)"""
    with LLM(str(qwen3_checkpoint), block_size=4, max_num_batched_tokens=16) as llm:
        check_scenario(llm, hf, references, "one_image")
        check_scenario(llm, hf, references, "several_images")
        hits = llm.engine.block_manager.prefix_hit_tokens
        check_scenario(llm, hf, references, "several_images")
        assert llm.engine.block_manager.prefix_hit_tokens - hits >= 100


def test_text_only(llm, hf, references):
    check_scenario(llm, hf, references, "text_only")


def test_one_image(llm, hf, references):
    check_scenario(llm, hf, references, "one_image")


def test_several_images_of_different_aspect_ratios(llm, hf, references):
    check_scenario(llm, hf, references, "several_images")


def test_mixed_batch(llm, hf, references):
    check_scenario(llm, hf, references, "mixed_batch")
