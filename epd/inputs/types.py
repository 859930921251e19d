"""Data that input processing hands to the engine.

A prompt becomes token ids in which every image is already expanded to one
placeholder token per merged patch, plus the processed images in prompt order.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ImageInput:
    """One image, resized, normalised and cut into patches, ready for the vision tower.

    `pixel_values` has shape [grid_t * grid_h * grid_w, channels * temporal_patch * patch * patch]
    in the patch order the Qwen2-VL vision tower expects (merge groups contiguous).
    `content_hash` identifies the decoded pixels: same pixels -> same hash, whatever the source.
    `raw_patches`, where the processor kept them, are the same patches as uint8 before rescaling
    and normalisation, one frame ([N, C * P * P]): what travels to another instance.
    """

    pixel_values: torch.Tensor
    grid_thw: tuple[int, int, int]
    content_hash: str
    raw_patches: torch.Tensor | None = None

    @property
    def num_patches(self) -> int:
        t, h, w = self.grid_thw
        return t * h * w

    def num_tokens(self, merge_size: int) -> int:
        """Placeholder tokens this image takes in the prompt (one per merged patch group)."""
        return self.num_patches // (merge_size * merge_size)


@dataclass(frozen=True)
class PlaceholderRange:
    """Where one image's placeholder tokens sit in the prompt: [offset, offset + length)."""

    offset: int
    length: int

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class ProcessedPrompt:
    """A prompt ready for the engine: expanded token ids and its images, aligned by index."""

    prompt_token_ids: list[int]
    images: list[ImageInput]
    placeholders: list[PlaceholderRange]
    prompt: str | None = None

    def __post_init__(self) -> None:
        if len(self.images) != len(self.placeholders):
            raise ValueError(f"{len(self.images)} images but {len(self.placeholders)} placeholder ranges")

    @property
    def mm_spans(self) -> list[tuple[int, int, str]]:
        """(offset, length, content_hash) per image: what the KV prefix cache keys on."""
        return [(p.offset, p.length, img.content_hash) for p, img in zip(self.placeholders, self.images)]
