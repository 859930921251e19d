"""Video files (MP4/MOV, WebM/Matroska, AVI) read with PyAV: the header on the front end, the
frames on the encoding side.

    front end                                    encoding side (PatchPool thread)
    ---------                                    --------------------------------
    bytes -> container header: frames, fps, size decode the sampled frames -> resize -> patchify
          -> sampled frame count -> grid, key    fewer frames or another size? -> InvalidInputError

Frames are sampled as transformers' `Qwen2VLVideoProcessor.sample_frames` does with `fps`
(SAMPLE_FPS frames per second, at least MIN_FRAMES, at most MAX_FRAMES, a multiple of
temporal_patch_size), so both sides pick the same frames from the header alone; the token count
is known before any frame is decoded, as an image's is from its header.

Qwen3-VL samples otherwise (`qwen3_sample_indices`: any count, first to last frame) and sizes every
frame by one pixel budget for the whole video (`qwen3_video_size`); each of its temporal groups is
an item of its own (epd.inputs.video.TimedVideo). Its file is read the same way: the front end
takes the header only (`timed_video_from_header`), and each group's item names the file, shared by
all of them, and the group's place in it (`VideoFileGroup`, held where an image holds its bytes).
The encoding side decodes the file once for all the groups it encodes (`qwen3_group_patches`):

    front end                                    encoding side
    ---------                                    -------------
    header -> sampled frames -> size, times      an encoder: the groups of one task, one decode
           -> items (1, h, w): VideoFileGroup    in process: every group, one decode, shared
                                                 (`TimedVideoFile`, the first group asked decodes)

The container is named from its first bytes and opened with that demuxer only: FFmpeg can open
formats that read other files or URLs (HLS playlists, concat lists), which untrusted bytes must
not reach. PyAV is optional (`pip install epd[video]`); without it video files are refused.
"""

from __future__ import annotations

import io
import math
import os
import threading
from collections.abc import Callable, Iterable
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from PIL import Image

from epd.inputs.errors import InvalidInputError
from epd.inputs.image import DataURL, image_key, read_image_bytes
from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.types import ImageInput
from epd.inputs.video import (
    TimedVideo,
    group_key,
    group_seconds,
    qwen3_video_size,
    raw_video_patches,
    video_key,
    video_patchify,
)

if TYPE_CHECKING:
    from epd.inputs.processor import InputLimits

VideoFileSource = bytes | bytearray | memoryview | str | os.PathLike | DataURL

SAMPLE_FPS = 2.0  # Qwen's recommended sampling rate
MIN_FRAMES = 4  # transformers' Qwen2VLVideoProcessor.min_frames
MAX_FRAMES = 768  # transformers' Qwen2VLVideoProcessor.max_frames


@dataclass(frozen=True)
class VideoHeader:
    num_frames: int
    fps: float
    width: int
    height: int


def is_video_file(data: bytes) -> bool:
    return _demuxer(data) is not None


def _demuxer(data: bytes) -> str | None:
    """The FFmpeg demuxer for a file's first bytes, or None (not a container we accept)."""
    if data[4:8] == b"ftyp":
        return "mp4"
    if data[:4] == b"\x1a\x45\xdf\xa3":
        return "matroska"
    if data[:4] == b"RIFF" and data[8:12] == b"AVI ":
        return "avi"
    return None


def _open(data: bytes):  # -> av.container.InputContainer
    try:
        import av
    except ImportError:
        raise InvalidInputError("video files need PyAV on the server (pip install epd[video])") from None
    demuxer = _demuxer(data)
    if demuxer is None:
        raise InvalidInputError("data is not a video in a supported container (MP4/MOV, WebM/Matroska, AVI)")
    try:
        container = av.open(io.BytesIO(data), format=demuxer)
    except (av.FFmpegError, ValueError, EOFError) as e:
        raise InvalidInputError(f"cannot read the video header: {e}") from None
    if not container.streams.video:
        container.close()
        raise InvalidInputError("the file has no video stream")
    return container


def read_video_header(
    data: bytes, max_frames: int | None = None, max_pixels: int | None = None
) -> VideoHeader:
    """Frame count, frame rate and size from the container, no frame decoded; refuses a video
    over `max_frames` frames or `max_pixels` pixels a frame (or one whose header lacks them)."""
    container = _open(data)
    try:
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate
        fps = float(rate) if rate else 0.0
        frames = stream.frames or round(_duration_s(container, stream) * fps)
        header = VideoHeader(frames, fps, stream.codec_context.width, stream.codec_context.height)
    finally:
        container.close()
    if header.num_frames <= 0 or header.fps <= 0:
        raise InvalidInputError("the video header gives no frame count or frame rate")
    if max_frames is not None and header.num_frames > max_frames:
        raise InvalidInputError(f"the video has {header.num_frames} frames, over the limit of {max_frames}")
    pixels = header.width * header.height
    if pixels <= 0 or (max_pixels is not None and pixels > max_pixels):
        raise InvalidInputError(
            f"the video's {header.width}x{header.height} frames are empty or over the limit of "
            f"{max_pixels} pixels"
        )
    return header


def _duration_s(container, stream) -> float:
    """The stream's length in seconds: Matroska headers give no frame count, only a duration."""
    if stream.duration and stream.time_base:
        return float(stream.duration * stream.time_base)
    return (container.duration or 0) / 1_000_000  # in AV_TIME_BASE units


def sample_indices(header: VideoHeader, temporal_patch_size: int) -> list[int]:
    """The frames to take, as transformers' `sample_frames(metadata, fps=SAMPLE_FPS)` picks them."""
    total = header.num_frames
    max_frames = math.floor(min(MAX_FRAMES, total) / temporal_patch_size) * temporal_patch_size
    wanted = total / header.fps * SAMPLE_FPS
    wanted = min(max(wanted, MIN_FRAMES), max_frames, total)
    num = math.floor(wanted / temporal_patch_size) * temporal_patch_size
    if num == 0:  # fewer frames than one temporal patch: all of them (the last is repeated)
        return list(range(total))
    return torch.arange(0, total, total / num).int().tolist()


def qwen3_sample_indices(header: VideoHeader) -> list[int]:
    """The frames Qwen3-VL takes: SAMPLE_FPS frames a second (at least MIN_FRAMES, at most
    MAX_FRAMES), spread evenly from the first frame to the last, any count (its processor pads the
    last group), as transformers' `Qwen3VLVideoProcessor.sample_frames` picks them."""
    total = header.num_frames
    num = int(total / header.fps * SAMPLE_FPS)
    num = min(max(num, MIN_FRAMES), MAX_FRAMES, total)
    return np.linspace(0, total - 1, num).round().astype(int).tolist()


def timed_video_from_header(data: bytes, cfg: ImageProcessorConfig, limits: InputLimits) -> TimedVideo:
    """Qwen3-VL: a video file -> one item per temporal group, with each group's time, from its
    header alone (the limits checked there): the frames it samples give the groups, their size
    and their times. Each item names the file and its group (`VideoFileGroup`); the side that
    encodes it decodes the file (`qwen3_group_patches`). Keyed by the file's bytes, as image
    files are, each group by the video's key and its place (epd.inputs.video.group_key)."""
    header = read_video_header(data, limits.max_video_frames, limits.max_image_pixels)
    indices = qwen3_sample_indices(header)
    h, w = qwen3_video_size(len(indices), header.height, header.width, cfg)
    seconds = group_seconds(indices, header.fps, cfg.temporal_patch_size)
    file = TimedVideoFile(data, len(seconds))
    key = video_key([image_key(data)], 0.0)
    grid = (1, h // cfg.patch_size, w // cfg.patch_size)
    groups = [
        ImageInput(None, grid, group_key(key, g), encoded=VideoFileGroup(file, g), modality="video")
        for g in range(len(seconds))
    ]
    return TimedVideo(groups, seconds)


class TimedVideoFile:
    """A Qwen3-VL video file as the items of its temporal groups share it: its bytes, once. Where
    the groups are made into patches one by one in this process (the in-process engine's
    `PatchPool`, epd.inputs.patches), the first group asked decodes the file for all of them,
    once, and the others take their rows (the pool's other threads wait for it). Each group's
    rows are kept here until taken, not after (a group asked again decodes the file again)."""

    def __init__(self, data: bytes, num_groups: int) -> None:
        self.data = data
        self.num_groups = num_groups
        self._lock = threading.Lock()
        self._untaken: dict[int, torch.Tensor] = {}  # decoded groups not yet taken
        self._error: InvalidInputError | None = None

    def group_patches(
        self, group: int, cfg: ImageProcessorConfig, grid: tuple[int, int, int]
    ) -> torch.Tensor:
        with self._lock:
            if group not in self._untaken and self._error is None:
                try:
                    self._untaken = qwen3_group_patches(self.data, cfg, grid, range(self.num_groups))
                except InvalidInputError as e:
                    self._error = e  # the file is bad for every group: found once for them all
            if self._error is not None:
                raise InvalidInputError(str(self._error))
            return self._untaken.pop(group)


@dataclass(frozen=True)
class VideoFileGroup:
    """Temporal group `group` of a Qwen3-VL video file: what its item holds where an image holds
    its file's bytes (`ImageInput.encoded`)."""

    file: TimedVideoFile
    group: int

    def patches(self, cfg: ImageProcessorConfig, grid: tuple[int, int, int]) -> torch.Tensor:
        return self.file.group_patches(self.group, cfg, grid)


def qwen3_group_patches(
    data: bytes, cfg: ImageProcessorConfig, grid: tuple[int, int, int], groups: Iterable[int]
) -> dict[int, torch.Tensor]:
    """uint8 patches [h * w, C * T * P * P] of temporal groups `groups` of a Qwen3-VL video file,
    whose frames the front end sized to `grid` (1, h, w) from its header (`qwen3_video_size`, by
    the video processor's pixel budget: the grid says it, this side's config may not).

    The file is decoded once, from its start up to the last wanted group's last frame, and only
    the wanted groups' frames are resized: the front end's sampling (`qwen3_sample_indices`), the
    last group padded with its last frame as transformers pads it. A file that ends early or whose
    frames are not the header's size raises `InvalidInputError`."""
    header = read_video_header(data)
    t, p = cfg.temporal_patch_size, cfg.patch_size
    indices = qwen3_sample_indices(header)
    indices += indices[-1:] * (-len(indices) % t)
    wanted_groups = sorted(set(groups))
    if not wanted_groups or wanted_groups[0] < 0 or wanted_groups[-1] >= len(indices) // t:
        raise InvalidInputError(f"temporal groups {wanted_groups} are not in the video")
    _, gh, gw = grid

    def resize(frame: Image.Image) -> np.ndarray:
        return np.asarray(frame.resize((gw * p, gh * p), resample=cfg.resample))

    wanted = [i for g in wanted_groups for i in indices[g * t : (g + 1) * t]]
    frames = _decode_frames(data, wanted, (header.width, header.height), resize)
    raw = torch.from_numpy(video_patchify(np.stack(frames), p, cfg.merge_size, t))
    return dict(zip(wanted_groups, raw.split(gh * gw), strict=True))


def sampled_fps(header: VideoHeader, temporal_patch_size: int) -> float:
    """The frame rate of the sampled frames (transformers' `VideoMetadata.sampled_fps`)."""
    return len(sample_indices(header, temporal_patch_size)) / header.num_frames * header.fps


def video_patches_from_file(
    data: bytes,
    cfg: ImageProcessorConfig,
    grid: tuple[int, int, int],
    groups: tuple[int, int] | None = None,
) -> torch.Tensor:
    """uint8 patches [N, C * T * P * P] of the sampled frames of a video file whose header gave
    `grid`; a file that ends early or decodes to another size raises `InvalidInputError`.

    `groups` [first, end): only those temporal groups (a chunk encoded on its own, IRP over a
    video's frames; `grid` is then the chunk's). Frames are decoded from the file's start up to
    the chunk's last one (no seeking: a keyframe seek is not frame-exact in every container), but
    only the chunk's are converted, resized and patchified."""
    header = read_video_header(data)
    wanted = sample_indices(header, cfg.temporal_patch_size)
    if groups is not None:
        wanted = _chunk_frames(wanted, groups, cfg.temporal_patch_size)
    frames = _decode_frames(data, wanted, (header.width, header.height))
    raw, decoded_grid = raw_video_patches(frames, cfg)
    if tuple(decoded_grid) != tuple(grid):
        raise InvalidInputError(f"the video decodes to grid {decoded_grid}, not {tuple(grid)}")
    return raw


def _chunk_frames(wanted: list[int], groups: tuple[int, int], temporal_patch_size: int) -> list[int]:
    """The sampled frames of temporal groups [first, end); the groups must be in the video."""
    first, end = groups
    if not 0 <= first < end or end * temporal_patch_size > len(wanted):
        raise InvalidInputError(f"temporal groups {first}..{end} are not in the video")
    return wanted[first * temporal_patch_size : end * temporal_patch_size]


def _decode_frames(
    data: bytes,
    wanted: list[int],
    size: tuple[int, int],
    convert: Callable[[Image.Image], Any] | None = None,
) -> list:
    """The frames at `wanted` (increasing indices) as RGB PIL images, or as `convert` makes each
    one as soon as it is decoded (so that only converted frames are held); stops after the last.
    A frame not of `size` (width, height), the header's, raises at once: the file is inconsistent."""
    import av

    container = _open(data)
    picks: dict[int, int] = {}
    for i in wanted:
        picks[i] = picks.get(i, 0) + 1
    frames = []
    try:
        for index, frame in enumerate(container.decode(container.streams.video[0])):
            if count := picks.get(index, 0):
                frames += [_picked_frame(frame.to_image(), size, convert)] * count
            if index >= wanted[-1]:
                break
    except InvalidInputError:
        raise
    except (av.FFmpegError, ValueError, EOFError) as e:
        raise InvalidInputError(f"cannot decode the video: {e}") from None
    finally:
        container.close()
    if len(frames) < len(wanted):
        raise InvalidInputError(
            f"the video ends after {len(frames)} of the {len(wanted)} frames its header promises "
            "(truncated or corrupt)"
        )
    return frames


def _picked_frame(
    image: Image.Image, size: tuple[int, int], convert: Callable[[Image.Image], Any] | None
) -> Any:
    if image.size != size:
        raise InvalidInputError(
            f"the video's frames are {image.width}x{image.height}, not the {size[0]}x{size[1]} its "
            "header gives; the file is inconsistent"
        )
    return image if convert is None else convert(image)


def read_video_bytes(source: VideoFileSource, limits: InputLimits) -> bytes:
    """The bytes of a video file given as bytes, a path (within the allowed media path), a data
    URL (`data:video/...`) or, with a remote fetcher, an http(s) URL; the byte limit applies."""
    if isinstance(source, DataURL):
        source = replace(source, media_type=_video_media_type(source.media_type))
    elif isinstance(source, str) and source[:5].lower() == "data:":
        header, comma, payload = source[5:].partition(",")
        media_type, *params = header.split(";")
        source = "data:" + ";".join([_video_media_type(media_type), *params]) + comma + payload
    return read_image_bytes(
        source,
        allowed_local_media_path=limits.allowed_local_media_path,
        max_image_bytes=limits.max_image_bytes,
        fetch_remote=limits.remote_fetcher,
    )


def _video_media_type(media_type: str) -> str:
    """A data URL's media type checked as a video's, named so that the image reader takes it."""
    media_type = media_type.strip().lower()
    if not (media_type.startswith("video/") or media_type in ("", "application/octet-stream")):
        raise InvalidInputError(f"data URL media type {media_type!r} is not a video")
    return "application/octet-stream"
