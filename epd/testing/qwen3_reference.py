"""transformers' Qwen3-VL prompt for tests, from its own processor functions.

`Qwen3VLProcessor` needs torchvision for its video half (not installed here), so a test builds the
prompt from the steps it runs: the chat template writes one pad per image or video, each image
pad becomes N = t * h * w / merge^2 copies, and each video pad becomes what
`Qwen3VLProcessor.replace_video_token` writes (every temporal group after its time in text).
"""

from __future__ import annotations

from types import SimpleNamespace

import torch
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.video_utils import VideoMetadata

IMAGE_PAD = "<|image_pad|>"
VIDEO_PAD = "<|video_pad|>"


def hf_video_text(
    grid: tuple[int, int, int], fps: float, indices: list[int], merge_size: int, temporal_patch_size: int
) -> str:
    """What `Qwen3VLProcessor.replace_video_token` writes for one video's pad: the video of this
    grid, sampled at frames `indices` of a source at `fps`."""
    processor = SimpleNamespace(
        video_processor=SimpleNamespace(merge_size=merge_size, temporal_patch_size=temporal_patch_size),
        video_token=VIDEO_PAD,
        vision_start_token="<|vision_start|>",
        vision_end_token="<|vision_end|>",
    )
    processor._calculate_timestamps = lambda *a: Qwen3VLProcessor._calculate_timestamps(processor, *a)
    metadata = VideoMetadata(total_num_frames=len(indices), fps=fps, frames_indices=indices)
    inputs = {"video_grid_thw": torch.tensor([grid]), "video_metadata": [metadata]}
    return Qwen3VLProcessor.replace_video_token(processor, inputs, 0)


def expand_image_pads(text: str, image_grids: list[tuple[int, int, int]], merge_size: int) -> str:
    """The i-th image pad of `text` as that image's N copies (what Qwen2VLProcessor does)."""
    pieces = text.split(IMAGE_PAD)
    if len(pieces) != len(image_grids) + 1:
        raise ValueError(f"{len(pieces) - 1} image pads for {len(image_grids)} images")
    out = pieces[0]
    for (t, h, w), rest in zip(image_grids, pieces[1:], strict=True):
        out += IMAGE_PAD * (t * h * w // merge_size**2) + rest
    return out
