"""InternVL through epd's offline `LLM`, token-exact against transformers, in three layouts.

The reference is transformers end to end: its InternVLProcessor makes each prompt's ids and
tiles, and HF `generate` runs them alone (CPU, fp32, greedy; computed once and shared by the
layouts). epd runs the prompts batched and paged, aggregated (1EPD) or with the image
embeddings sent from encoder instances to a prefill instance and the KV on to a decode
instance. Images go in as PIL images and as PNG files (those only have their header read here:
the instance that encodes them decodes and tiles them).
"""

from __future__ import annotations

import io
import random

import pytest
import torch

from epd import LLM, SamplingParams
from epd.testing.checkpoints import build_tiny_internvl_checkpoint, hf_internvl_processor
from epd.testing.images import noise_image
from epd.testing.reference import assert_logprobs_match, hf_greedy, load_hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=3)
WORDS = "the image shows a small red car near a tall green tree and two people walking".split()
LAYOUTS = ["1EPD", "1E+1P+1D", "2E+1P+1D"]


def user_prompt(text: str, num_images: int) -> str:
    return f"<|im_start|>user\n{'<IMG_CONTEXT>' * num_images}\n{text}<|im_end|>\n<|im_start|>assistant\n"


def png(image) -> bytes:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return buf.getvalue()


def case(text: str, images: list, as_files: bool = False) -> tuple[object, str, list]:
    """(epd prompt, transformers' text, PIL images) of one request."""
    prompt = user_prompt(text, len(images))
    if not images:
        return prompt, prompt, []
    sources = [png(img) for img in images] if as_files else images
    return {"prompt": prompt, "multi_modal_data": {"image": sources}}, prompt, images


def mixed_cases(n: int, seed: int) -> list:
    """Text-only and 1-3 image prompts of different lengths and image sizes (1 to 7 tiles)."""
    rng = random.Random(seed)
    cases = []
    for i in range(n):
        text = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 20)))
        sizes = [(rng.randint(40, 300), rng.randint(40, 300)) for _ in range(rng.choice([0, 1, 2, 3]))]
        images = [noise_image(w, h, seed=seed * 100 + i * 5 + j) for j, (w, h) in enumerate(sizes)]
        cases.append(case(text, images, as_files=i % 2 == 1))
    return cases


# Square, wide (3 tiles + thumbnail), tall, large (6 + 1), very wide.
SIZES = [(64, 64), (300, 100), (97, 311), (500, 400), (700, 40)]
SCENARIOS = {
    "text_only": [case("Describe a cat sleeping on the window.", []), ("The quick brown fox",) * 2 + ([],)],
    "one_image": [case("What is in this picture?", [noise_image(150, 100, seed=1)])],
    "several_images": [
        case(
            "Compare these images.", [noise_image(w, h, seed=10 + i) for i, (w, h) in enumerate(SIZES)], True
        )
    ],
    "mixed_batch": mixed_cases(6, seed=3),
}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_internvl_checkpoint(tmp_path_factory.mktemp("internvl") / "tiny")


@pytest.fixture(scope="module")
def hf(checkpoint):
    return load_hf_model(checkpoint), hf_internvl_processor(checkpoint)


@pytest.fixture(scope="module")
def references() -> dict:
    """(scenario, index) -> transformers' (prompt ids, tokens, logprobs), filled as tests need them."""
    return {}


@pytest.fixture(scope="module", params=LAYOUTS)
def llm(request, checkpoint):
    with LLM(
        str(checkpoint), layout=request.param, max_num_seqs=8, max_model_len=1024, num_kv_blocks=512
    ) as llm:
        yield llm


def reference(hf, text: str, images: list) -> tuple[list[int], list[int], list[torch.Tensor]]:
    model, processor = hf
    inputs = processor(text=[text], images=images or None, return_tensors="pt")
    ids = inputs["input_ids"][0].tolist()
    mm = {"pixel_values": inputs["pixel_values"]} if images else {}
    return ids, *hf_greedy(model, ids, GREEDY.max_tokens, **mm)


def check_scenario(llm: LLM, hf, references: dict, scenario: str) -> None:
    cases = SCENARIOS[scenario]
    outputs = llm.generate([c[0] for c in cases], GREEDY, use_tqdm=False)
    for i, ((_, text, images), out) in enumerate(zip(cases, outputs)):
        if (scenario, i) not in references:
            references[scenario, i] = reference(hf, text, images)
        prompt_ids, expected, logprobs = references[scenario, i]
        assert out.prompt_token_ids == prompt_ids, f"prompt {i}"
        got = out.outputs[0]
        assert got.token_ids == expected, f"prompt {i}"
        assert_logprobs_match(got.logprobs, expected, logprobs)


def test_chunked_prefill_and_prefix_cache(checkpoint, hf, references):
    """Chunks of 16 tokens end inside images; the second run hits the prefix cache, images
    included. (First, so that it runs before any multi-instance layout shares the two cores.)"""
    with LLM(str(checkpoint), block_size=4, max_num_batched_tokens=16) as llm:
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
