"""The CPU work around the model that a request's latency includes, timed on this host.

| stage     | where it runs                          | one measurement times                            |
|-----------|----------------------------------------|--------------------------------------------------|
| front_end | the API process, once per request      | a chat request with n images of one size through |
|           |                                        | the server's processor: each image's base64,     |
|           |                                        | header and content key; the template and tokens  |
| patches   | the encoding side (a PatchPool thread) | one image file -> uint8 patches: decode, RGB,    |
|           |                                        | resize, patchify                                 |

Images are `epd bench`'s synthetic ones (JPEG data URLs of noisy colour fields) at the encode
grid's sides. Not timed: HTTP and JSON parsing before the processor, which depend on the server's
event loop more than on the request.

Shapes (epd.plan.profile.store): front_end [images, pixels of each] (one size per request),
patches [pixels, t, h, w]: the file's pixels and the grid of patches made from them.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from statistics import median

from epd.bench.serve.synthetic import bench_image
from epd.bench.serve.workload import image_data_url
from epd.inputs.image import read_image_bytes
from epd.inputs.patches import patches_from_file
from epd.inputs.processor import InputProcessor
from epd.plan.profile.store import Measurement

Log = Callable[[str], None]
HOST_STAGES = ("front_end", "patches")
IMAGES_PER_REQUEST = (0, 1, 4)


def time_host(
    stage: str, model: str, sides: Sequence[int], warmup: int, repeats: int, log: Log
) -> list[Measurement]:
    processor = InputProcessor.from_pretrained(model)
    urls = {side: image_data_url(bench_image(side, side, seed=side), "JPEG") for side in sides}
    timed = _time_front_end if stage == "front_end" else _time_patches
    return timed(processor, urls, warmup, repeats, log)


def _time_front_end(
    processor: InputProcessor, urls: dict[int, str], warmup: int, repeats: int, log: Log
) -> list[Measurement]:
    out = []
    for side, url in urls.items():
        for count in IMAGES_PER_REQUEST:
            if count == 0 and out:
                continue  # a text-only request is the same at every side
            content = [{"type": "image_url", "image_url": {"url": url}}] * count
            messages = [{"role": "user", "content": [*content, {"type": "text", "text": "Describe."}]}]
            seconds = _median_time(lambda m=messages: processor.process_chat(m), warmup, repeats)
            log(f"[front_end] {count} x {side} px: {seconds * 1e3:.2f} ms")
            out.append(Measurement([count, side * side if count else 0], seconds))
    return out


def _time_patches(
    processor: InputProcessor, urls: dict[int, str], warmup: int, repeats: int, log: Log
) -> list[Measurement]:
    out = []
    for side, url in urls.items():
        data = read_image_bytes(url)
        grid = tuple(processor.process_chat(_one_image(url)).images[0].grid_thw)
        seconds = _median_time(
            lambda d=data, g=grid: patches_from_file(d, processor.image_config, g), warmup, repeats
        )
        log(f"[patches] {side} px: {seconds * 1e3:.2f} ms")
        out.append(Measurement([side * side, *grid], seconds))
    return out


def _one_image(url: str) -> list[dict]:
    return [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": url}}]}]


def _median_time(fn: Callable[[], object], warmup: int, repeats: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(max(1, repeats)):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return median(times)
