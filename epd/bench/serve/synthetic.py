"""The synthetic workload: noise images of chosen sizes, text of a chosen length, fixed output length.

Per request, in order: text-only with probability `text_only_share`; otherwise a number of
images drawn from `images_per_request`; each image repeats one already sent with probability
`image_reuse` (any earlier one, equally likely; the encoder cache can then skip it), else it
is a new image of a size drawn from `image_sizes`. Images are smooth colour fields plus noise
(`bench_image`: real pixel variety, so compressed sizes and decode costs are realistic),
seeded from --seed, sent as JPEG data URLs; each is made once per process (a sweep sends the
same images to every layout). Drawing a field costs several times more than encoding it (34 ms
against 6-9 ms at 1344 px on a 2-core machine), and a benchmark may want thousands, so a new image
is a seeded variant of a few drawn ones (`distinct_bench_image`, ~1 ms at 1344 px): unlike every
other image (no cache hits), alike in its pixel statistics (so in its JPEG size). `ignore_eos`
makes every request generate exactly `output_tokens`, so runs do the same work whatever the model
says. With --classes, each
request's class is drawn from --seed alone: every run of a sweep sends the same sequence of
classes, each with new images, so that its runs differ in rate and not in their mix.

Which image goes where is decided from its (width, height, seed) alone; `image_url` turns that into
what is sent. The simulator (epd.sim) passes its own, to draw the same requests without pixels.
"""

from __future__ import annotations

import functools
import random
from collections.abc import Callable

import numpy as np
from PIL import Image, ImageChops

from epd.bench.serve.spec import RequestClass, SizeBucket, WorkloadSpec
from epd.bench.serve.text import PromptText
from epd.bench.serve.workload import BenchRequest, derive_seed, image_data_url, user_message

ImageUrl = Callable[[int, int, int], str]  # (width, height, seed of its pixels) -> the URL sent


class _ImagePool:
    """New or repeated images, each made once (a repeat sends byte-identical data)."""

    def __init__(self, spec: WorkloadSpec, seed: int, namespace: str, image_url: ImageUrl) -> None:
        self.spec, self.seed, self.namespace, self.image_url = spec, seed, namespace, image_url
        self.urls: list[str] = []

    def draw(self, rng: random.Random, sizes: tuple[SizeBucket, ...] | None = None) -> str:
        if self.urls and rng.random() < self.spec.image_reuse:
            return rng.choice(self.urls)
        bucket = _pick_size(sizes or self.spec.image_sizes, rng)
        image_seed = derive_seed(self.seed, self.namespace, "image", len(self.urls))
        url = self.image_url(bucket.width, bucket.height, image_seed)
        self.urls.append(url)
        return url


@functools.lru_cache(maxsize=4096)
def _jpeg_url(width: int, height: int, seed: int) -> str:
    return image_data_url(distinct_bench_image(width, height, seed), "JPEG")


BASE_IMAGES = 8  # drawn per size: enough that no two images look alike at a glance
BAND_ROWS = 16  # rows of fresh noise per image: what makes it unlike any other (a shift may repeat)


def distinct_bench_image(width: int, height: int, seed: int) -> Image.Image:
    """An image like `bench_image`'s, unlike any other seed's, without drawing a new field: one of
    `BASE_IMAGES` drawn images of this size (each once per process), shifted by a seeded offset (the
    field wraps around), with a seeded band of its rows re-noised, which makes it distinct."""
    rng = np.random.default_rng(seed)
    base = _base_image(width, height, int(rng.integers(BASE_IMAGES)))
    image = ImageChops.offset(base, int(rng.integers(width)), int(rng.integers(height)))  # a new image
    top = int(rng.integers(max(1, height - BAND_ROWS + 1)))
    band = np.asarray(image.crop((0, top, width, min(height, top + BAND_ROWS))), np.int16)
    noise = rng.integers(-25, 26, band.shape, dtype=np.int16)
    image.paste(Image.fromarray(np.clip(band + noise, 0, 255).astype(np.uint8), "RGB"), (0, top))
    return image


@functools.lru_cache(maxsize=64)
def _base_image(width: int, height: int, index: int) -> Image.Image:
    """Shared by every image drawn from it: read only (ImageChops.offset makes a new image)."""
    return bench_image(width, height, derive_seed("base image", width, height, index))


def bench_image(width: int, height: int, seed: int) -> Image.Image:
    """A smooth random colour field (drawn at 1/8 size, upscaled) plus per-pixel noise.

    Like epd.testing.images.noise_image, but ~20x faster at 1344 px (float32, a small field): a
    sweep draws hundreds of large images, and drawing them must not take longer than serving them.
    """
    rng = np.random.default_rng(seed)
    small = rng.uniform(0, 255, (max(1, height // 8), max(1, width // 8), 3)).astype(np.uint8)
    field = np.asarray(Image.fromarray(small, "RGB").resize((width, height), Image.BICUBIC), np.int16)
    noise = rng.integers(-25, 26, (height, width, 3), dtype=np.int16)
    return Image.fromarray(np.clip(field + noise, 0, 255).astype(np.uint8), "RGB")


def _pick_size(buckets: tuple[SizeBucket, ...], rng: random.Random) -> SizeBucket:
    return rng.choices(buckets, weights=[b.weight for b in buckets])[0]


def synthetic_requests(
    spec: WorkloadSpec,
    n: int,
    seed: int,
    namespace: str,
    tokenizer_dir: str | None,
    image_url: ImageUrl | None = None,
) -> list[BenchRequest]:
    rng = random.Random(derive_seed(seed, namespace, "synthetic"))
    # Classes come from the seed alone: every run of a sweep sends the same sequence of classes
    # (with its own images), so that its runs differ in rate, not in their mix.
    class_rng = random.Random(derive_seed(seed, "classes"))
    pool, text = _ImagePool(spec, seed, namespace, image_url or _jpeg_url), PromptText(tokenizer_dir)
    extra = {"temperature": spec.temperature}
    if spec.ignore_eos:
        extra["ignore_eos"] = True
    requests = []
    for _ in range(n):
        if spec.classes:
            cls = class_rng.choices(spec.classes, weights=[c.share for c in spec.classes])[0]
            requests.append(_class_request(spec, cls, rng, pool, text, extra))
            continue
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


def _class_request(
    spec: WorkloadSpec, cls: RequestClass, rng: random.Random, pool: _ImagePool, text: PromptText, extra: dict
) -> BenchRequest:
    """One request of `cls` (epd.bench.serve.classes): its images, output length, and its SLO sent
    along (the server's slo_ttft / slo_tpot fields)."""
    num_images = rng.randint(*cls.images_per_request)
    urls = [pool.draw(rng, cls.image_sizes) for _ in range(num_images)]
    prompt, counted = text.make(spec.prompt_tokens, rng)
    fields = dict(extra)
    if cls.slo.ttft is not None:
        fields["slo_ttft"] = cls.slo.ttft
    if cls.slo.tpot is not None:
        fields["slo_tpot"] = cls.slo.tpot
    message = user_message(urls, prompt)
    return BenchRequest(message, cls.output_tokens, num_images, fields, None, counted, cls.name, cls.slo)
