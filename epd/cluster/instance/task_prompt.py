"""A `PrefillTask` (or a KV hand-off's meta) back into the prompt the language model takes."""

from __future__ import annotations

import torch

from epd.cluster.messages import PrefillTask
from epd.inputs.types import ImageInput, PlaceholderRange, ProcessedPrompt


def prompt_from_task(task: PrefillTask, pixels: list[torch.Tensor] | None = None) -> ProcessedPrompt:
    """The prompt as the language model needs it. `pixels`: each image's float patches, for an
    instance that encodes in-process (EP); without them (the images are encoded on another
    instance) the pixel tensors stay empty."""
    if pixels is None:
        pixels = [torch.empty(0)] * len(task.grids)
    intervals = task.time_intervals or [1.0] * len(task.grids)
    images = [
        ImageInput(px, tuple(g), h, time_interval=t)
        for px, g, h, t in zip(pixels, task.grids, task.image_hashes, intervals)
    ]
    placeholders = [PlaceholderRange(o, n) for o, n in task.placeholders]
    return ProcessedPrompt(list(task.prompt_token_ids), images, placeholders, task.prompt)
