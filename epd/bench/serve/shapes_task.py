"""The `shapes` workload: requests of the demo task (epd.demo.shapes), with their answers.

A request of one image asks the single-image question, of 2 to 4 images the multi-image one
(the task's two kinds); `--images-per-request` picks the mix (default 1). Images go as PNG:
JPEG would smear the palette colours the task is about. Greedy decoding, and no ignore_eos:
the answer ends where the model says so, and is scored with the task's own exact match.
"""

from __future__ import annotations

import random

from epd.bench.serve.spec import WorkloadSpec
from epd.bench.serve.workload import BenchRequest, derive_seed, image_data_url, user_message
from epd.demo.shapes import make_sample

MAX_IMAGES = 4  # the task's largest request


def shapes_requests(spec: WorkloadSpec, n: int, seed: int, namespace: str) -> list[BenchRequest]:
    low, high = spec.images_per_request
    if low < 1 or high > MAX_IMAGES:
        raise ValueError(f"shapes requests have 1 to {MAX_IMAGES} images, not {low}-{high}")
    rng = random.Random(derive_seed(seed, namespace, "shapes"))
    requests = []
    for i in range(n):
        sample = make_sample(f"bench/{seed}/{namespace}/{i}", rng.randint(low, high))
        urls = [image_data_url(image, "PNG") for image in sample.render()]
        requests.append(
            BenchRequest(
                messages=user_message(urls, sample.question),
                max_tokens=spec.output_tokens,
                num_images=len(urls),
                extra={"temperature": 0.0},
                expected=sample.answer,
            )
        )
    return requests
