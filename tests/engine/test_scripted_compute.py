"""Scripted compute as an encoder instance and a prefill instance see it: the scripted vision tower,
embeddings through an MM cache, and virtual time spent per forward (epd.engine.scripted_runner)."""

from __future__ import annotations

from functools import partial

import pytest
import torch

from epd import SamplingParams
from epd.clock import WALL_CLOCK, VirtualClock
from epd.engine.llm_engine import LLMEngine
from epd.engine.mm_cache import MMCache
from epd.engine.scripted_runner import scripted_parts, scripted_vision
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.sim.costs import LinearCosts
from epd.testing.images import noise_image

PARAMS = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
IMAGE_PROMPT = "<|vision_start|><|image_pad|><|vision_end|>describe"


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def prompt(model):
    processor = InputProcessor.from_pretrained(model)
    image = noise_image(56, 84, 7)
    return processor.process_prompt({"prompt": IMAGE_PROMPT, "multi_modal_data": {"image": [image]}})


def config(model: str):
    return EngineArgs(model=model, block_size=4, num_kv_blocks=256).engine_config()


def engine(model: str, **kwargs) -> LLMEngine:
    parts = partial(scripted_parts, costs=kwargs.pop("costs", None))
    tokenizer = InputProcessor.from_pretrained(model).tokenizer
    return LLMEngine(config(model), tokenizer, model_parts=parts, **kwargs)


def run(engine: LLMEngine, prompt) -> list[int]:
    engine.add_request("r", prompt, PARAMS)
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                return out.outputs[0].token_ids
    raise AssertionError("never finished")


def embeddings(model: str, prompt) -> torch.Tensor:
    tower = scripted_vision(config(model).model, torch.device("cpu"), WALL_CLOCK)
    image = prompt.images[0]
    [embeds] = tower.encode_images(image.pixel_values, [image.grid_thw])
    return embeds


def test_the_scripted_tower_samples_pixels_exactly_and_holds_no_weights(model, prompt):
    embeds = embeddings(model, prompt)
    hf = config(model).model.hf
    assert embeds.shape == (prompt.placeholders[0].length, hf.vision.out_hidden_size)
    assert torch.equal(embeds, embeddings(model, prompt))
    assert embeds.unique().numel() > 10, "rows must differ, or a mixed-up row would go unnoticed"
    tower = scripted_vision(config(model).model, torch.device("cpu"), WALL_CLOCK)
    assert list(tower.parameters()) == [] and tower.config.vision.spatial_merge_size == 2


def test_embeddings_from_an_mm_cache_give_the_tokens_of_encoding_here_and_a_wrong_row_does_not(model, prompt):
    expected = run(engine(model), prompt)
    hf = config(model).model.hf
    content_hash = prompt.images[0].content_hash

    def from_cache(embeds: torch.Tensor) -> list[int]:
        cache = MMCache(64, 16, hf.text.hidden_size)
        assert cache.put(content_hash, embeds)
        return run(engine(model, encode_locally=False, mm_cache=cache), prompt)

    embeds = embeddings(model, prompt)
    assert from_cache(embeds) == expected
    wrong = embeds.clone()
    wrong[-1, 0] += 1
    assert from_cache(wrong) != expected


def test_with_costs_each_forward_moves_the_virtual_clock_on(model, prompt):
    clock = VirtualClock()
    costs = LinearCosts(step_s=1.0, token_s=0.0, sequence_s=0.0, encode_s=10.0, patch_s=0.0)
    tokens = run(engine(model, clock=clock, costs=costs), prompt)
    # One encode (10 s) and one forward per token (1 s each): the tokens are those of no costs.
    assert clock.now() == pytest.approx(10.0 + PARAMS.max_tokens)
    assert tokens == run(engine(model), prompt)
    with pytest.raises(TypeError, match="VirtualClock"):
        engine(model, costs=costs)  # the wall clock cannot be moved
