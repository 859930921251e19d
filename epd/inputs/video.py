"""Qwen2-VL / Qwen2.5-VL video preprocessing: frames -> one item with a grid t > 1; Qwen3-VL:
frames -> one item per temporal group, each after its time in the prompt (`TimedVideo`, below).

A video is processed like its frames as images (the same smart_resize, PIL bicubic resize,
rescale and normalisation: epd.inputs.image_processor), then every `temporal_patch_size`
consecutive frames become one temporal patch, as transformers' `Qwen2VLVideoProcessor.patchify`
lays them out. One row per patch of one temporal step:

    row = ((gt * (grid_h // m) + bh) * (grid_w // m) + bw) * m * m + mh * m + mw
    col = ((c * T + t) * P + ph) * P + pw

so slice t of a row is the image processor's patch of frame gt * T + t (tests/inputs checks it
against transformers' image processor). A frame count that is not a multiple of T is padded by
repeating the last frame, as transformers does.

transformers' video processor resizes with torchvision; without torchvision we resize with PIL
as its image processor does. The grids agree (same smart_resize); the pixels may differ by the
two libraries' rounding.

M-RoPE time: Qwen2-VL numbers temporal patches 0, 1, 2...; Qwen2.5-VL moves
`tokens_per_second * second_per_grid_t` per temporal patch (`time_interval`), with
second_per_grid_t = T / fps. Frames given without fps count as 24 fps (transformers' default).
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import image_content_hash, to_rgb
from epd.inputs.image_processor import (
    ImageProcessorConfig,
    expand_patches,
    normalization_table,
    smart_resize,
)
from epd.inputs.types import ImageInput

DEFAULT_FPS = 24.0  # transformers' VideoMetadata.sampled_fps when frames come without metadata


@dataclass(frozen=True)
class VideoOptions:
    """How a model takes video. `tokens_per_second`: Qwen2.5-VL's time scaling (None: the time
    index counts temporal patches, Qwen2-VL). `max_frames`: frames a request's video may have."""

    supported: bool = True
    tokens_per_second: float | None = None
    max_frames: int | None = None
    # Qwen3-VL: each temporal group after its time in text, one item per group (`TimedVideo`),
    # frames resized by the video processor's own config (its pixel budget counts every frame).
    timestamps: bool = False
    config: ImageProcessorConfig | None = None


NO_VIDEO = VideoOptions(supported=False)


def video_grid_thw(
    num_frames: int, height: int, width: int, cfg: ImageProcessorConfig
) -> tuple[int, int, int]:
    """(grid_t, grid_h, grid_w) of a video of this size, without touching pixels."""
    if num_frames <= 0:
        raise InvalidInputError("the video has no frames")
    h, w = smart_resize(height, width, cfg.factor, cfg.min_pixels, cfg.max_pixels)
    t = -(-num_frames // cfg.temporal_patch_size)
    return t, h // cfg.patch_size, w // cfg.patch_size


def time_interval(fps: float, cfg: ImageProcessorConfig, options: VideoOptions) -> float:
    """How far the M-RoPE time index moves per temporal patch, in transformers' float32 arithmetic
    (`tokens_per_second * second_per_grid_ts[i]`, a float32 tensor)."""
    if options.tokens_per_second is None:
        return 1.0
    if not fps > 0:
        raise InvalidInputError(f"a video's fps must be positive, got {fps}")
    second_per_grid = torch.tensor(cfg.temporal_patch_size / fps, dtype=torch.float32)
    return float(options.tokens_per_second * second_per_grid)


def process_video_frames(
    frames: Sequence[Image.Image] | np.ndarray,
    cfg: ImageProcessorConfig,
    options: VideoOptions = VideoOptions(),
    fps: float | None = None,
) -> ImageInput:
    """Resize, rescale, normalise and patchify a clip given as frames (PIL images, or uint8
    [F, H, W, 3]); one `ImageInput` with modality "video"."""
    images = _frames_as_images(frames, options)
    interval = time_interval(fps or DEFAULT_FPS, cfg, options)
    key = video_key([image_content_hash(img) for img in images], interval)
    raw, grid = raw_video_patches(images, cfg)
    pixels = expand_patches(raw, normalization_table(cfg), cfg.temporal_patch_size, cfg.patch_size)
    return ImageInput(pixels, grid, key, raw_patches=raw, modality="video", time_interval=interval)


def raw_video_patches(
    frames: Sequence[Image.Image], cfg: ImageProcessorConfig
) -> tuple[torch.Tensor, tuple[int, int, int]]:
    """RGB frames of one size -> uint8 patches [N, C * T * P * P] and the grid."""
    width, height = frames[0].size
    if any(f.size != (width, height) for f in frames):
        raise InvalidInputError("all frames of a video must have the same size")
    grid = video_grid_thw(len(frames), height, width, cfg)
    h, w = grid[1] * cfg.patch_size, grid[2] * cfg.patch_size
    resized = np.stack([np.asarray(f.resize((w, h), resample=cfg.resample)) for f in frames])
    raw = video_patchify(resized, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size)
    return torch.from_numpy(raw), grid


def video_patchify(
    frames: np.ndarray, patch_size: int, merge_size: int, temporal_patch_size: int
) -> np.ndarray:
    """[F, H, W, C] -> [grid_t * grid_h * grid_w, C * T * P * P] in the order of the module
    docstring; F is padded to a multiple of T with copies of the last frame."""
    if pad := -len(frames) % temporal_patch_size:
        frames = np.concatenate([frames, np.repeat(frames[-1:], pad, axis=0)])
    num, height, width, channels = frames.shape
    gt, gh, gw = num // temporal_patch_size, height // patch_size, width // patch_size
    m, p, t = merge_size, patch_size, temporal_patch_size
    x = frames.reshape(gt, t, gh // m, m, p, gw // m, m, p, channels)
    x = x.transpose(0, 2, 5, 3, 6, 8, 1, 4, 7)  # (gt, bh, bw, mh, mw, C, t, ph, pw)
    return np.ascontiguousarray(x.reshape(gt * gh * gw, channels * t * p * p))


def video_key(frame_hashes: Sequence[str], interval: float) -> str:
    """A video's cache key: its frames' keys in order and its time interval (which changes its
    M-RoPE positions, so its KV: the prefix cache must not mix two fps of one clip)."""
    h = hashlib.sha256(f"video|{interval!r}|{len(frame_hashes)}|".encode())
    for frame in frame_hashes:
        h.update(frame.encode())
    return h.hexdigest()


def _frames_as_images(frames: Sequence[Image.Image] | np.ndarray, options: VideoOptions) -> list[Image.Image]:
    if isinstance(frames, np.ndarray):
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8:
            raise InvalidInputError(
                f"video frames as an array must be uint8 [F, H, W, 3], got {frames.shape}"
            )
        frames = [Image.fromarray(f) for f in frames]
    if not frames:
        raise InvalidInputError("the video has no frames")
    if options.max_frames is not None and len(frames) > options.max_frames:
        raise InvalidInputError(f"the video has {len(frames)} frames, over the limit of {options.max_frames}")
    if not all(isinstance(f, Image.Image) for f in frames):
        raise InvalidInputError("a video given as frames must be a list of PIL images")
    return [to_rgb(f) for f in frames]


# ---- Qwen3-VL: timestamps in the prompt, one item per temporal group -------------------------
#
# Qwen3-VL writes each temporal group of a video into the prompt apart, after its time in text
# (transformers' `Qwen3VLProcessor.replace_video_token`):
#
#     <|vision_start|> <0.3 seconds> <|vision_start|> pads <|vision_end|> <1.0 seconds> ... <|vision_end|>
#
# and its `get_rope_index` places each group as an image of grid (1, h, w), after that text: no
# time row from an fps. So each group is an item of its own here (`TimedVideo.groups`), encoded,
# cached and sent like an image (the tower never mixes groups: epd.inputs.video_chunks). Frames
# given as such are processed here; a file's groups each name the file and their place in it, and
# are decoded where they are encoded (epd.inputs.video_file.VideoFileGroup).


@dataclass(frozen=True)
class TimedVideo:
    """A Qwen3-VL video: one item per temporal group (grid (1, h, w)) and each group's time in
    seconds, as its prompt text gives it."""

    groups: list[ImageInput]
    seconds: list[float]


def timestamp_text(seconds: float) -> str:
    """The text before a temporal group's tokens, as transformers writes it."""
    return f"<{seconds:.1f} seconds>"


def group_seconds(frame_indices: Sequence[int], fps: float, temporal_patch_size: int) -> list[float]:
    """Each temporal group's time: the mean of its first and last frame's, the frame list padded
    with its last index (transformers' `Qwen3VLProcessor._calculate_timestamps`)."""
    indices = list(frame_indices)
    indices += indices[-1:] * (-len(indices) % temporal_patch_size)
    times = [i / fps for i in indices]
    t = temporal_patch_size
    return [(times[i] + times[i + t - 1]) / 2 for i in range(0, len(times), t)]


def qwen3_video_size(num_frames: int, height: int, width: int, cfg: ImageProcessorConfig) -> tuple[int, int]:
    """Resized (height, width) of a Qwen3-VL video's frames: the pixel budget counts every frame
    (transformers' `video_processing_qwen3_vl.smart_resize`)."""
    factor, temporal = cfg.factor, cfg.temporal_patch_size
    if num_frames < temporal:
        raise InvalidInputError(f"a video needs at least {temporal} frames, got {num_frames}")
    if height < factor or width < factor:
        scale = max(factor / height, factor / width)
        height, width = int(height * scale), int(width * scale)
    if max(height, width) / min(height, width) > 200:
        raise InvalidInputError(f"a video's aspect ratio must be under 200, got {width}x{height}")
    h_bar, w_bar = round(height / factor) * factor, round(width / factor) * factor
    t_bar = round(num_frames / temporal) * temporal
    if t_bar * h_bar * w_bar > cfg.max_pixels:
        beta = math.sqrt(num_frames * height * width / cfg.max_pixels)
        h_bar = max(factor, math.floor(height / beta / factor) * factor)
        w_bar = max(factor, math.floor(width / beta / factor) * factor)
    elif t_bar * h_bar * w_bar < cfg.min_pixels:
        beta = math.sqrt(cfg.min_pixels / (num_frames * height * width))
        h_bar = math.ceil(height * beta / factor) * factor
        w_bar = math.ceil(width * beta / factor) * factor
    return h_bar, w_bar


def process_timed_video(
    frames: Sequence[Image.Image] | np.ndarray,
    cfg: ImageProcessorConfig,
    options: VideoOptions,
    fps: float | None = None,
    frame_indices: Sequence[int] | None = None,
) -> TimedVideo:
    """Qwen3-VL: a clip's frames (the sampled ones, `frame_indices` in the source video at `fps`;
    given frames count as consecutive) -> one item per temporal group, with each group's time."""
    images = _frames_as_images(frames, options)
    width, height = images[0].size
    if any(img.size != (width, height) for img in images):
        raise InvalidInputError("all frames of a video must have the same size")
    h, w = qwen3_video_size(len(images), height, width, cfg)
    resized = np.stack([np.asarray(img.resize((w, h), resample=cfg.resample)) for img in images])
    key = video_key([image_content_hash(img) for img in images], 0.0)
    indices = range(len(images)) if frame_indices is None else frame_indices
    seconds = group_seconds(indices, fps or DEFAULT_FPS, cfg.temporal_patch_size)
    return timed_video_from_resized(resized, cfg, key, seconds)


def timed_video_from_resized(
    resized: np.ndarray, cfg: ImageProcessorConfig, key: str, seconds: list[float]
) -> TimedVideo:
    """Qwen3-VL: frames already at their `qwen3_video_size`, uint8 [F, h, w, 3], keyed `key` ->
    one item per temporal group, with each group's time (`seconds`)."""
    h, w = resized.shape[1:3]
    raw = torch.from_numpy(video_patchify(resized, cfg.patch_size, cfg.merge_size, cfg.temporal_patch_size))
    return TimedVideo(
        split_groups_as_items(raw, (h // cfg.patch_size, w // cfg.patch_size), key, cfg), seconds
    )


def split_groups_as_items(
    raw: torch.Tensor, grid_hw: tuple[int, int], key: str, cfg: ImageProcessorConfig
) -> list[ImageInput]:
    """uint8 patches of a whole video -> one item per temporal group, each keyed by the video's key
    and its group (the same frames in another video may be resized otherwise)."""
    gh, gw = grid_hw
    rows = gh * gw
    table = normalization_table(cfg)
    items = []
    for g in range(len(raw) // rows):
        part = raw[g * rows : (g + 1) * rows]
        pixels = expand_patches(part, table, cfg.temporal_patch_size, cfg.patch_size)
        items.append(ImageInput(pixels, (1, gh, gw), group_key(key, g), raw_patches=part, modality="video"))
    return items


def group_key(video_key: str, group: int) -> str:
    """The key of a Qwen3-VL video's temporal group: the video's key and the group's place."""
    return hashlib.sha256(f"{video_key}|group {group}".encode()).hexdigest()
