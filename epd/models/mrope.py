"""Multimodal RoPE positions for a prompt, as transformers' `get_rope_index` computes them.

Text tokens advance all three position rows together. An image's tokens take
(t, row, column) positions on the merged grid, offset by the position where the image
starts; the text after the image resumes at one past the largest position used. The
difference between the next position and the next token index (`delta`) is what decode
adds to every later token's index, so it must travel with the request's KV.

A video is one item whose grid has t > 1: its time row takes `floor(i * time_interval)` for
temporal patch i (float32, as transformers computes it: Qwen2.5-VL's interval is tokens_per_second
times the seconds per temporal patch; Qwen2-VL's is 1). The text after it resumes at
`start + max(gh, gw)` as after an image, whatever its time rows reached (transformers 5 does the
same), while `delta` counts the largest position of all.

Qwen3-VL's video needs nothing else either: transformers' `get_rope_index` places each temporal
group as an image of grid (1, h, w) after its timestamp text, and each group is an item of its
own here (epd.inputs.video.TimedVideo), so its time row is its start, as an image's.

Plain 1-D RoPE (InternVL) needs nothing else here: its images' grids are strips one row tall,
whose width row numbers their tokens like text, and its LLM reads that row (epd.models.internvl).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def mrope_positions(
    num_tokens: int,
    placeholders: Sequence[tuple[int, int]],
    grids: Sequence[tuple[int, int, int]],
    merge_size: int,
    time_intervals: Sequence[float] | None = None,
) -> tuple[torch.Tensor, int]:
    """Positions [3, num_tokens] for a prompt and its decode delta.

    `placeholders` are (offset, length) of each image's tokens, in prompt order;
    `grids` the matching (t, h, w) patch grids before merging; `time_intervals` each item's
    time step per temporal patch (None or empty: 1 for all).
    """
    pieces: list[torch.Tensor] = []
    cursor, next_pos = 0, 0
    intervals = list(time_intervals or [1.0] * len(grids))
    for (offset, length), (t, h, w), interval in zip(placeholders, grids, intervals):
        text_len = offset - cursor
        pieces.append(torch.arange(text_len).expand(3, -1) + next_pos)
        next_pos += text_len
        gh, gw = h // merge_size, w // merge_size
        if t * gh * gw != length:
            raise ValueError(
                f"image at {offset} has {length} placeholder tokens, its grid gives {t * gh * gw}"
            )
        pieces.append(_grid_positions(t, gh, gw, interval) + next_pos)
        next_pos += max(gh, gw)
        cursor = offset + length
    tail = num_tokens - cursor
    pieces.append(torch.arange(tail).expand(3, -1) + next_pos)
    positions = torch.cat(pieces, dim=1)
    delta = int(positions.max()) + 1 - num_tokens if num_tokens else 0
    return positions, delta


def _grid_positions(t: int, gh: int, gw: int, interval: float = 1.0) -> torch.Tensor:
    times = torch.arange(t)
    if interval != 1.0:
        times = (times * torch.tensor(interval, dtype=torch.float32)).long()
    tt, hh, ww = torch.meshgrid(times, torch.arange(gh), torch.arange(gw), indexing="ij")
    return torch.stack([tt, hh, ww]).view(3, -1)


def decode_positions(start: int, count: int, delta: int) -> torch.Tensor:
    """Positions [3, count] for tokens start..start+count-1 that follow the prompt."""
    return (torch.arange(start, start + count) + delta).expand(3, -1)
