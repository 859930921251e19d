"""Videos as prompts bring them -> items: which values are videos, and how each becomes one.

    multi_modal_data["video"] = video | [video, ...]
    video = [PIL frames] | uint8 array [F, H, W, 3] | (frames, {"fps": float})   # processed now
          | bytes | path | data:video/... URL | DataURL                        # a file: header only

A file is checked, keyed and sized from its container header (epd.inputs.video_file) and decoded
where it is encoded, as image files are, Qwen3-VL's too (each of its temporal groups an item that
names the file); frames are processed at once (epd.inputs.video).
"""

from __future__ import annotations

import json
import os
from typing import TYPE_CHECKING, Any

import numpy as np
from PIL import Image

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import DataURL, image_key
from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.types import ImageInput
from epd.inputs.video import (
    NO_VIDEO,
    TimedVideo,
    VideoOptions,
    process_timed_video,
    process_video_frames,
    time_interval,
    video_grid_thw,
    video_key,
)
from epd.inputs.video_file import (
    VideoFileSource,
    read_video_bytes,
    read_video_header,
    sample_indices,
    sampled_fps,
    timed_video_from_header,
)

if TYPE_CHECKING:
    from epd.inputs.processor import InputLimits


def load_video(
    video: Any, cfg: ImageProcessorConfig, options: VideoOptions, limits: InputLimits
) -> ImageInput | TimedVideo:
    """One video of a prompt as one item (modality "video", grid t > 1); for Qwen3-VL
    (`options.timestamps`) as its temporal groups with their times."""
    if options.timestamps:
        return _timed_video(video, options.config or cfg, options, limits)
    if _is_video_file_source(video):
        return _video_file(video, cfg, options, limits)
    frames, fps = _video_frames(video)
    return process_video_frames(frames, cfg, options, fps)


def _timed_video(
    video: Any, cfg: ImageProcessorConfig, options: VideoOptions, limits: InputLimits
) -> TimedVideo:
    if _is_video_file_source(video):
        return timed_video_from_header(read_video_bytes(video, limits), cfg, limits)
    frames, fps = _video_frames(video)
    return process_timed_video(frames, cfg, options, fps)


def _video_file(
    source: VideoFileSource, cfg: ImageProcessorConfig, options: VideoOptions, limits: InputLimits
) -> ImageInput:
    data = read_video_bytes(source, limits)
    header = read_video_header(data, limits.max_video_frames, limits.max_image_pixels)
    num_frames = len(sample_indices(header, cfg.temporal_patch_size))
    grid = video_grid_thw(num_frames, header.height, header.width, cfg)
    interval = time_interval(sampled_fps(header, cfg.temporal_patch_size), cfg, options)
    key = video_key([image_key(data)], interval)
    return ImageInput(None, grid, key, encoded=data, modality="video", time_interval=interval)


def video_sources(mm_data: Any) -> list[Any]:
    """The videos of `multi_modal_data`: one video (a list of frames, an array, a (frames, meta)
    pair) or a list of them."""
    videos = mm_data.get("video") if isinstance(mm_data, dict) else None
    if videos is None:
        return []
    if _is_one_video(videos):
        return [videos]
    if isinstance(videos, list):
        return videos
    raise InvalidInputError(
        "a video must be a list of PIL frames, a uint8 array [F, H, W, 3] or (frames, meta)"
    )


def _is_video_file_source(value: Any) -> bool:
    return isinstance(value, (bytes, bytearray, memoryview, str, os.PathLike, DataURL))


def _is_one_video(value: Any) -> bool:
    if _is_video_file_source(value):
        return True
    if isinstance(value, np.ndarray) or (
        isinstance(value, tuple) and len(value) == 2 and isinstance(value[1], dict)
    ):
        return True
    return isinstance(value, list) and bool(value) and isinstance(value[0], Image.Image)


def _video_frames(video: Any) -> tuple[Any, float | None]:
    """(frames, fps or None) of one video as `multi_modal_data` gives it."""
    fps = None
    if isinstance(video, tuple) and len(video) == 2 and isinstance(video[1], dict):
        video, meta = video
        fps = meta.get("fps")
        if fps is not None and (not isinstance(fps, (int, float)) or not fps > 0):
            raise InvalidInputError(f"a video's fps must be a positive number, got {fps!r}")
    if not isinstance(video, (list, np.ndarray)):
        raise InvalidInputError(
            f"a video must be a list of PIL frames or a uint8 array [F, H, W, 3], not {type(video).__name__}"
        )
    return video, fps


def video_options(model_dir: str | os.PathLike, max_frames: int | None = None) -> VideoOptions:
    """Video for Qwen2-VL (time index per temporal patch), Qwen2.5-VL (tokens_per_second) and
    Qwen3-VL (timestamps in the prompt, its video processor's sizes); other families refuse it."""
    config = _read_json(model_dir, "config.json") or {}
    family = config.get("model_type")
    if family == "qwen3_vl":
        return VideoOptions(max_frames=max_frames, timestamps=True, config=video_processor_config(model_dir))
    if family not in ("qwen2_vl", "qwen2_5_vl"):
        return NO_VIDEO
    per_second = (config.get("vision_config") or {}).get("tokens_per_second", 4)
    return VideoOptions(
        tokens_per_second=per_second if family == "qwen2_5_vl" else None, max_frames=max_frames
    )


def video_processor_config(model_dir: str | os.PathLike) -> ImageProcessorConfig:
    """The video processor's config, where transformers' `BaseVideoProcessor` looks for it:
    processor_config.json's "video_processor", then video_preprocessor_config.json, then
    preprocessor_config.json (the image processor's)."""
    nested = (_read_json(model_dir, "processor_config.json") or {}).get("video_processor")
    for d in (nested, _read_json(model_dir, "video_preprocessor_config.json")):
        if isinstance(d, dict):
            return ImageProcessorConfig.from_dict(d)
    return ImageProcessorConfig.from_pretrained(model_dir)


def _read_json(model_dir: str | os.PathLike, name: str) -> dict | None:
    path = os.path.join(model_dir, name)
    if not os.path.exists(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)
