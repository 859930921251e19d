"""The bench's synthetic images: seeded (same seed, same image), every one distinct (no cache hits on
the server), with the pixel variety of a drawn one, while only a few fields per size are drawn."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from epd.bench.serve.spec import SizeBucket, WorkloadSpec
from epd.bench.serve.synthetic import BASE_IMAGES, _base_image, bench_image, distinct_bench_image
from epd.bench.serve.workload import build_requests


def digest(width: int, height: int, seed: int) -> str:
    return hashlib.sha256(distinct_bench_image(width, height, seed).tobytes()).hexdigest()


def test_the_same_seed_gives_the_same_image_in_a_fresh_process():
    first = [digest(96, 64, seed) for seed in range(20)]
    _base_image.cache_clear()  # as a new process would: the base images drawn again
    assert [digest(96, 64, seed) for seed in range(20)] == first


@pytest.mark.parametrize("size", [(96, 64), (40, 8), (1, 1)])
def test_every_seed_gives_a_distinct_image_of_its_size(size):
    width, height = size
    images = [distinct_bench_image(width, height, seed) for seed in range(300)]
    assert all(image.size == size and image.mode == "RGB" for image in images)
    if size != (1, 1):  # 16.7M colours, 300 draws: distinct unless the band missed, which it cannot
        assert len({image.tobytes() for image in images}) == len(images)


def test_only_a_few_fields_are_drawn_per_size():
    _base_image.cache_clear()
    for seed in range(200):
        distinct_bench_image(128, 96, seed)
    assert _base_image.cache_info().misses <= BASE_IMAGES


def test_pixels_vary_like_a_drawn_image():
    drawn = np.asarray(bench_image(256, 192, seed=5), np.float64)
    for seed in range(5):
        variant = np.asarray(distinct_bench_image(256, 192, seed), np.float64)
        assert variant.std() == pytest.approx(drawn.std(), rel=0.25)  # a colour field, not a flat one
        # Neighbouring pixels differ by the noise, as in a drawn image: JPEG sizes stay realistic.
        assert np.abs(np.diff(variant, axis=1)).mean() == pytest.approx(
            np.abs(np.diff(drawn, axis=1)).mean(), rel=0.25
        )


def test_a_workload_of_many_new_images_sends_no_image_twice():
    spec = WorkloadSpec(images_per_request=(2, 2), image_sizes=(SizeBucket(64, 48),), image_reuse=0.0)
    requests = build_requests(spec, 150, seed=3, namespace="run0", tokenizer_dir=None)
    urls = [
        p["image_url"]["url"] for r in requests for p in r.messages[0]["content"] if p["type"] == "image_url"
    ]
    assert len(urls) == 300 and len(set(urls)) == 300
    assert all(url.startswith("data:image/jpeg;base64,") for url in urls)
