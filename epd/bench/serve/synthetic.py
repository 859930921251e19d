"""The synthetic workload: noise images of chosen sizes, text of a chosen length, fixed output length.

Per request, in order: text-only with probability `text_only_share`; otherwise a number of
images drawn from `images_per_request`; each image repeats one already sent with probability
`image_reuse` (any earlier one, equally likely; the encoder cache can then skip it), else it
is a new image of a size drawn from `image_sizes`. Images are `noise_image`s (smooth colour
fields plus noise: real pixel variety, so compressed sizes and decode costs are realistic),
seeded from --seed, sent as JPEG data URLs. `ignore_eos` makes every request generate exactly
`output_tokens`, so runs do the same work whatever the model says.
"""

from __future__ import annotations

import random

from epd.bench.serve.spec import SizeBucket, WorkloadSpec
from epd.bench.serve.text import PromptText
from epd.bench.serve.workload import BenchRequest, derive_seed, image_data_url, user_message
from epd.testing.images import noise_image


class _ImagePool:
    """New or repeated images, each encoded once (a repeat sends byte-identical data)."""

    def __init__(self, spec: WorkloadSpec, seed: int, namespace: str) -> None:
        self.spec, self.seed, self.namespace = spec, seed, namespace
        self.urls: list[str] = []

    def draw(self, rng: random.Random) -> str:
        if self.urls and rng.random() < self.spec.image_reuse:
            return rng.choice(self.urls)
        bucket = _pick_size(self.spec.image_sizes, rng)
        image_seed = derive_seed(self.seed, self.namespace, "image", len(self.urls))
        url = image_data_url(noise_image(bucket.width, bucket.height, image_seed), "JPEG")
        self.urls.append(url)
        return url


def _pick_size(buckets: tuple[SizeBucket, ...], rng: random.Random) -> SizeBucket:
    return rng.choices(buckets, weights=[b.weight for b in buckets])[0]


def synthetic_requests(
    spec: WorkloadSpec, n: int, seed: int, namespace: str, tokenizer_dir: str | None
) -> list[BenchRequest]:
    rng = random.Random(derive_seed(seed, namespace, "synthetic"))
    pool, text = _ImagePool(spec, seed, namespace), PromptText(tokenizer_dir)
    extra = {"temperature": spec.temperature}
    if spec.ignore_eos:
        extra["ignore_eos"] = True
    requests = []
    for _ in range(n):
        text_only = rng.random() < spec.text_only_share
        num_images = 0 if text_only else rng.randint(*spec.images_per_request)
        urls = [pool.draw(rng) for _ in range(num_images)]
        prompt, counted = text.make(spec.prompt_tokens, rng)
        requests.append(
            BenchRequest(
                user_message(urls, prompt), spec.output_tokens, num_images, dict(extra), None, counted
            )
        )
    return requests
