"""Data that input processing hands to the engine.

A prompt becomes token ids in which every image is already expanded to one
placeholder token per merged patch, plus the processed images in prompt order.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from epd.inputs.video_file import VideoFileGroup


@dataclass(frozen=True)
class ImageInput:
    """One image of a prompt: its size in patches, its cache key, and its pixels in one of three forms.

    | form          | field          | made by                             | shape                |
    |---------------|----------------|-------------------------------------|----------------------|
    | file bytes    | `encoded`      | the front end (reads the header)    | PNG/JPEG/... as sent |
    | uint8 patches | `raw_patches`  | the encoding side (inputs/patches)  | [N, C * P * P]       |
    | float patches | `pixel_values` | the encoding side, on its device    | [N, C * T * P * P]   |

    The front end keeps only the file bytes: decoding, resizing and patchifying happen where the
    image is encoded (its instance's worker pool), so that work scales with the encoders.
    `pixel_values` rows are in the patch order the Qwen2-VL vision tower expects (merge groups
    contiguous). `content_hash` keys every cache (router, encoder and prefill MM caches, the KV
    prefix cache): see `epd.inputs.image.image_key`.

    A video is one item too, with grid t > 1 (one step per `temporal_patch_size` frames): its
    uint8 patches already hold their T distinct frames ([N, C * T * P * P]), and `time_interval`
    is how far its M-RoPE time index moves per temporal patch (Qwen2.5-VL: tokens_per_second *
    seconds per temporal patch; 1 for Qwen2-VL and for images). See epd.inputs.video.

    A Qwen3-VL video is one item per temporal group (grid (1, h, w)); where it came as a file, each
    group's `encoded` is a `VideoFileGroup` instead of bytes: the file, shared by its groups, and
    the group's place in it, decoded where the group is encoded (epd.inputs.video_file).
    """

    pixel_values: torch.Tensor | None
    grid_thw: tuple[int, int, int]
    content_hash: str
    raw_patches: torch.Tensor | None = None
    encoded: bytes | VideoFileGroup | None = None
    modality: str = "image"  # or "video"
    time_interval: float = 1.0

    @property
    def is_video(self) -> bool:
        return self.modality == "video"

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
