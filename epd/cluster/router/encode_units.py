"""What the router sends to encoders for a request's images: one unit per image, or, for a video
whose grid has several temporal groups, one per chunk of groups (IRP over its frames).

| unit        | key (cache, transfer)        | work item (ledger)            | pixels sent                  |
|-------------|------------------------------|-------------------------------|------------------------------|
| an image,   | its content hash             | its index in the request      | its file, or its uint8 rows  |
| a whole     |                              |                               |                              |
| video       |                              |                               |                              |
| a chunk of  | "<video hash>#groups=a-b/t"  | (index + 1) * CHUNK_STRIDE + a| the chunk's rows; or the     |
| a video     | (epd.inputs.video_chunks)    |                               | file, whole, with (a, b)     |
| a Qwen3-VL  | its content hash             | its index in the request      | the file, whole, with (g,    |
| file's group|                              |                               | g + 1), once per task        |

A chunk is encoded exactly like an image (the Qwen towers never mix temporal groups:
epd.inputs.video_chunks); the prefill instance joins the chunks back into the video
(epd.cluster.instance.video_assembly). Its messages name its image index as an image's do, and its
key besides (`EncodeDone.keys`), from which `work_item` finds its reservation again.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from epd.cluster.messages import EncodeItem
from epd.inputs.types import ImageInput
from epd.inputs.video_chunks import VideoChunk, parse_chunk_key, split_groups
from epd.inputs.video_file import VideoFileGroup

CHUNK_STRIDE = 1 << 32  # more temporal groups than any video has: chunk work items never collide


class EncodeUnit(NamedTuple):
    index: int  # the image's index in its request
    key: str  # the image's content hash, or the chunk's key
    num_patches: int
    item: EncodeItem

    @property
    def work_item(self) -> int:
        return work_item(self.index, self.key)


def work_item(index: int, key: str) -> int:
    """The ledger's item of a unit: the image index, or a number of its own for a chunk."""
    chunk = parse_chunk_key(key)
    return index if chunk is None else (index + 1) * CHUNK_STRIDE + chunk.first


def encode_units(images: Sequence[ImageInput], indices: Sequence[int], parts: int) -> list[EncodeUnit]:
    """The units of the images at `indices`: each video of t >= 2 temporal groups in
    min(parts, t) chunks of whole groups, as equal as can be; every other image whole."""
    units = []
    for index in indices:
        image = images[index]
        spans = split_groups(image.grid_thw[0], parts) if image.is_video else [(0, 1)]
        if len(spans) == 1:
            units.append(EncodeUnit(index, image.content_hash, image.num_patches, encode_item(index, image)))
            continue
        for first, end in spans:
            item = chunk_item(index, image, first, end)
            units.append(EncodeUnit(index, item.content_hash, _patches(item.grid), item))
    return units


def encode_item(index: int, image: ImageInput) -> EncodeItem:
    """One image as it travels to an encoder: its file (the encoder decodes it), or its uint8
    patches where it came processed (8x fewer bytes than the tower's float input). A Qwen3-VL
    video file's group: the file (the same bytes object for all its groups, so that a message
    carries it once: epd.cluster.messages) and the group to take from it."""
    if isinstance(image.encoded, VideoFileGroup):
        group, file = image.encoded.group, image.encoded.file.data
        return EncodeItem(index, image.content_hash, image.grid_thw, b"", 0, file, (group, group + 1), True)
    if image.encoded is not None:
        return EncodeItem(index, image.content_hash, image.grid_thw, b"", 0, image.encoded)
    if image.raw_patches is None:
        raise ValueError("images sent to another instance need their file bytes or raw_patches")
    raw = image.raw_patches.contiguous()
    return EncodeItem(index, image.content_hash, image.grid_thw, raw.numpy().tobytes(), raw.shape[1])


def chunk_item(index: int, image: ImageInput, first: int, end: int) -> EncodeItem:
    """Temporal groups [first, end) of a video as they travel to an encoder: their own rows of
    its uint8 patches, or its whole file with the groups to take from it."""
    t, h, w = image.grid_thw
    key = VideoChunk(image.content_hash, first, end, t).key
    grid = (end - first, h, w)
    if image.encoded is not None:
        return EncodeItem(index, key, grid, b"", 0, image.encoded, (first, end))
    if image.raw_patches is None:
        raise ValueError("videos sent to another instance need their file bytes or raw_patches")
    rows = image.raw_patches[first * h * w : end * h * w].contiguous()
    return EncodeItem(index, key, grid, rows.numpy().tobytes(), rows.shape[1])


def _patches(grid: tuple[int, int, int]) -> int:
    t, h, w = grid
    return t * h * w
