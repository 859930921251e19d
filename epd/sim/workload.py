"""Seeded synthetic requests: Poisson arrivals, prompts with 0..N images from a shared pool.

A prompt is a system prompt every request shares, then each image followed by some of its text,
then the rest of the text. Images are drawn from a small pool with a skewed popularity (image i is
picked with weight 1 / (i + 1)), so many repeat across requests, and now and then within one: the
encoder caches, the prefill MM caches and the KV prefix cache (the shared system prompt, and the
first image after it) all get hits. Everything comes from one
`random.Random(seed)` and from pixels made from the seed, so the same spec gives the same requests
in any process.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from epd.config import ModelConfig
from epd.inputs.image_processor import ImageProcessorConfig, process_image
from epd.inputs.types import ImageInput, PlaceholderRange, ProcessedPrompt
from epd.sampling_params import SamplingParams
from epd.testing.images import noise_image


@dataclass(frozen=True)
class Workload:
    num_requests: int = 1000
    rate_per_s: float = 40.0  # mean arrivals per second (exponential gaps)
    seed: int = 0
    image_pool: int = 24  # distinct images
    max_images: int = 3  # per request: 0..max_images
    image_sides: tuple[int, ...] = (56, 84, 112)  # pixels per side; 56 px -> 4 tokens
    system_tokens: int = 24  # shared by every request
    prompt_tokens: tuple[int, int] = (8, 96)  # text tokens after it, inclusive range
    output_tokens: tuple[int, int] = (1, 24)  # max_tokens, inclusive range


@dataclass(frozen=True)
class SimRequest:
    request_id: str
    arrival_time: float
    prompt: ProcessedPrompt
    params: SamplingParams


def make_requests(workload: Workload, model: ModelConfig) -> list[SimRequest]:
    """The workload's requests in arrival order, for the tokenizer and image processor of `model`."""
    rng = random.Random(workload.seed)
    pool = image_pool(workload, ImageProcessorConfig.from_pretrained(model.model))
    weights = [1.0 / (i + 1) for i in range(len(pool))]
    shaper = _PromptShaper(model)
    system = [rng.randrange(shaper.text_vocab) for _ in range(workload.system_tokens)]
    requests, now = [], 0.0
    for i in range(workload.num_requests):
        now += rng.expovariate(workload.rate_per_s)
        images = rng.choices(pool, weights, k=rng.randint(0, workload.max_images))
        num_text = rng.randint(*workload.prompt_tokens)
        text = [rng.randrange(shaper.text_vocab) for _ in range(num_text)]
        prompt = shaper.prompt(system, text, images)
        params = SamplingParams(temperature=0.0, max_tokens=rng.randint(*workload.output_tokens))
        requests.append(SimRequest(f"r{i:05d}", now, prompt, params))
    return requests


def image_pool(workload: Workload, processor: ImageProcessorConfig) -> list[ImageInput]:
    rng = random.Random(workload.seed + 1)
    sides = workload.image_sides
    return [
        process_image(noise_image(rng.choice(sides), rng.choice(sides), workload.seed * 1000 + i), processor)
        for i in range(workload.image_pool)
    ]


class _PromptShaper:
    """Token ids with each image's placeholder run (one token per merged patch group) spliced in,
    as the processor lays them out."""

    def __init__(self, model: ModelConfig) -> None:
        hf = model.hf
        self.image_token = hf.image_token_id
        self.merge = hf.vision.spatial_merge_size
        # Ordinary text stays below the special tokens (they follow the learned vocabulary).
        self.text_vocab = min(hf.image_token_id, *hf.eos_token_ids)

    def prompt(self, system: list[int], text: list[int], images: list[ImageInput]) -> ProcessedPrompt:
        """`system`, then each image followed by its share of `text`, then the rest of `text`."""
        share = len(text) // (len(images) + 1)
        tokens, placeholders = list(system), []
        for k, image in enumerate(images):
            length = image.num_tokens(self.merge)
            placeholders.append(PlaceholderRange(len(tokens), length))
            tokens += [self.image_token] * length + text[share * k : share * (k + 1)]
        tokens += text[share * len(images) :]
        return ProcessedPrompt(tokens, list(images), placeholders, None)
