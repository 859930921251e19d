"""Tiny test videos encoded with PyAV (the `video` extra): lossless FFV1 in Matroska, whose decoded
frames are exactly the frames written, or MPEG-4 Part 2 in MP4 (lossy, like real clips)."""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

from PIL import Image

from epd.testing.images import noise_image

LOSSLESS = ("matroska", "ffv1", "bgr0")
MP4 = ("mp4", "mpeg4", "yuv420p")


def encode_video(frames: Sequence[Image.Image], fps: float, kind: tuple[str, str, str] = LOSSLESS) -> bytes:
    """The frames as a video file of `kind` = (container, codec, pixel format)."""
    import av

    container_format, codec, pix_fmt = kind
    out = io.BytesIO()
    with av.open(out, mode="w", format=container_format) as container:
        stream = container.add_stream(codec, rate=Fraction(fps).limit_denominator(1000))
        stream.width, stream.height = frames[0].size
        stream.pix_fmt = pix_fmt
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_image(frame).reformat(format=pix_fmt)):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return out.getvalue()


def noise_clip(num_frames: int, width: int = 84, height: int = 56, seed: int = 0) -> list[Image.Image]:
    """Frames that all differ (so a wrong frame order or pick shows)."""
    return [noise_image(width, height, seed=seed * 1000 + i) for i in range(num_frames)]
