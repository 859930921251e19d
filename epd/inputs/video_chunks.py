"""A video's temporal groups in chunks: IRP over its frames (one chunk per encoder instance).

The Qwen vision towers never mix two temporal groups (`temporal_patch_size` frames each, `grid_t`
of them): attention runs per group (Qwen2.5-VL's windows lie inside one too), the rotary and
learned position embeddings depend on (row, column) only, and the mergers (Qwen3-VL's deepstack
ones too) work per merged token. So encoding groups [0, t1) and [t1, t) apart and joining the rows
gives the embeddings of the whole grid, bit for bit on CPU fp32 (checked for the three families,
against transformers as well: tests/cluster/test_video_irp.py).

    video (t, h, w), key K          chunk [a, b): grid (b - a, h, w), key "K#groups=a-b/t"
    rows [t * h * w / m^2, ...]     rows [a * h * w / m^2, b * h * w / m^2) of the video's

A chunk's key names its video's key and its group range (and the video's group count, so that a
prefill instance can tell when every chunk is in before it knows the request): an encoder caches
chunks under these keys; the prefill instance joins them and caches the video under its own key,
so a later request with the same video is a whole-video hit whatever the split was.
"""

from __future__ import annotations

from typing import NamedTuple

CHUNK_MARK = "#groups="


class VideoChunk(NamedTuple):
    """Temporal groups [first, end) of the video keyed `video_key`, which has `total` groups."""

    video_key: str
    first: int
    end: int
    total: int

    @property
    def key(self) -> str:
        return f"{self.video_key}{CHUNK_MARK}{self.first}-{self.end}/{self.total}"


def parse_chunk_key(key: str) -> VideoChunk | None:
    """The chunk a cache key names, or None for the key of a whole image or video."""
    video_key, mark, groups = key.rpartition(CHUNK_MARK)
    if not mark:
        return None
    span, _, total = groups.partition("/")
    first, _, end = span.partition("-")
    return VideoChunk(video_key, int(first), int(end), int(total))


def item_key(key: str) -> str:
    """The key of the whole item a cache key belongs to (itself unless it names a chunk)."""
    chunk = parse_chunk_key(key)
    return key if chunk is None else chunk.video_key


def split_groups(total: int, parts: int) -> list[tuple[int, int]]:
    """`total` temporal groups in min(parts, total) ranges of whole groups, as equal as can be
    (the larger ones first): [(0, t1), (t1, t2), ...]."""
    parts = max(1, min(parts, total))
    size, extra = divmod(total, parts)
    ranges, first = [], 0
    for i in range(parts):
        end = first + size + (1 if i < extra else 0)
        ranges.append((first, end))
        first = end
    return ranges
