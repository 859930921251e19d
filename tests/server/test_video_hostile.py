"""Hostile video input to the shared server: each gets a clear 400 naming what is wrong, and the
server serves the next request as before. Refused at the front end from the header alone: a
video with 10k frames (over --max-video-frames, 4096 by default), an MP4 cut in half (its index
is at the end), video bytes where an image is expected and the reverse, URLs the media policy
refuses. A Matroska file cut in half keeps a valid header: the encoder instance finds the end
early and the router answers 400 for that request only."""

from __future__ import annotations

import base64

import openai
import pytest

from epd.testing.images import noise_image
from epd.testing.videos import MP4, encode_video, noise_clip

from .conftest import MODEL_NAME
from .helpers import data_url, encode_image

pytest.importorskip("av")


def ask(client, part: dict):
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": [part, {"type": "text", "text": "what is this"}]}],
        max_tokens=2,
        temperature=0,
    )


def video(url: str) -> dict:
    return {"type": "video_url", "video_url": {"url": url}}


def video_url(data: bytes, mime: str = "video/mp4") -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode()


@pytest.fixture(scope="module")
def clip_mp4() -> bytes:
    return encode_video(noise_clip(12, seed=31), 4, kind=MP4)


def assert_refused(client, part: dict, message: str) -> None:
    with pytest.raises(openai.BadRequestError, match=message):
        ask(client, part)


def test_ten_thousand_frames_refused_from_the_header(client):
    frames = [noise_image(16, 16, seed=0)] * 10_000
    assert_refused(
        client, video(video_url(encode_video(frames, 25, kind=MP4))), "10000 frames, over the limit"
    )


def test_truncated_mp4_refused_from_the_header(client, clip_mp4):
    assert_refused(client, video(video_url(clip_mp4[: len(clip_mp4) // 2])), "cannot read the video header")


def test_truncated_matroska_fails_at_the_encoder_alone(client):
    data = encode_video(noise_clip(12, seed=32), 4)
    assert_refused(
        client, video(video_url(data[: len(data) // 2], "video/x-matroska")), "truncated or corrupt"
    )


def test_video_where_an_image_is_expected(client, clip_mp4):
    as_image = {"type": "image_url", "image_url": {"url": video_url(clip_mp4, "image/png")}}
    assert_refused(client, as_image, "not an image")
    as_video_type = {"type": "image_url", "image_url": {"url": video_url(clip_mp4)}}
    assert_refused(client, as_video_type, "not an image")


def test_image_where_a_video_is_expected(client):
    png = encode_image(noise_image(64, 48, seed=3), "PNG")
    assert_refused(client, video(data_url(png)), "not a video")
    assert_refused(client, video(video_url(png)), "not a video in a supported container")


def test_media_policy_applies_to_video_urls(client, media_dir):
    assert_refused(client, video("http://example.com/clip.mp4"), "remote")
    assert_refused(client, video(str(media_dir.parent / "outside.mp4")), "outside the allowed media")
    assert_refused(client, video("ftp://host/clip.mp4"), "unsupported")


def test_server_still_serves_video_after_the_refusals(client, clip_mp4):
    reply = ask(client, video(video_url(clip_mp4)))
    assert reply.choices[0].finish_reason in ("stop", "length")
