"""The host CPU's work around the model, as delays in the simulation (from `epd profile`'s
front_end and patches stages: epd.plan.profile.costs.ProfileHostCosts).

| work                               | where it runs in a real cluster     | simulated as                  |
|------------------------------------|-------------------------------------|-------------------------------|
| the request's images read (base64, | the API process, before the router  | the request reaches the       |
| header, key), template, tokens     | sees the request                    | router that much later        |
| an image file -> uint8 patches     | the encoding instance's PatchPool   | the task with the images      |
| (decode, RGB, resize, patchify)    | threads, one image per thread, from | (EncodeTask, or PrefillTask   |
|                                    | the moment the task arrives         | for EP/EPD) arrives later, by |
|                                    |                                     | its slowest image's time      |

What this leaves out: the pool's threads are never short (a host with fewer free cores than images
in flight would queue them), and the API process's HTTP and JSON parsing, which the profile does
not time.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

import msgspec

from epd.cluster.messages import EncodeItem, EncodeTask, PrefillTask
from epd.inputs.types import ProcessedPrompt
from epd.sim.images import source_pixels


class HostCosts(Protocol):
    def front_end_seconds(self, image_pixels: Sequence[int]) -> float: ...

    def patches_seconds(self, pixels: int, grid: tuple[int, int, int]) -> float: ...


def front_end_delay(costs: HostCosts | None, prompt: ProcessedPrompt) -> float:
    if costs is None:
        return 0.0
    return costs.front_end_seconds([source_pixels(image.content_hash) for image in prompt.images])


def patches_delay(costs: HostCosts | None, message: msgspec.Struct) -> float:
    """How much later than its delivery `message`'s images have their patches made."""
    if costs is None:
        return 0.0
    if isinstance(message, EncodeTask):
        items: Sequence[EncodeItem] = message.items
    elif isinstance(message, PrefillTask) and message.pixels:
        items = message.pixels
    else:
        return 0.0
    times = [costs.patches_seconds(source_pixels(i.content_hash), tuple(i.grid)) for i in items]
    return max(times, default=0.0)
