"""Hostile video input, to the shared Qwen2.5-VL server and to a Qwen3-VL one: each gets a clear 400
naming what is wrong, and the server serves the next request as before. Refused at the front end
from the header alone: a video with 10k frames (over --max-video-frames, 4096 by default), an
MP4 cut in half (its index is at the end), video bytes where an image is expected and the
reverse, URLs the media policy refuses. A Matroska file cut in half keeps a valid header: the
encoder instance finds the end early (Qwen3-VL's too, which decodes the file for the temporal
groups it encodes: epd.inputs.video_file) and the router answers 400 for that request only."""

from __future__ import annotations

import base64

import openai
import pytest

from epd.testing.checkpoints import build_tiny_checkpoint
from epd.testing.images import noise_image
from epd.testing.videos import MP4, encode_video, noise_clip

from .conftest import API_KEY, MODEL_NAME
from .helpers import ServerProcess, data_url, encode_image

pytest.importorskip("av")


def ask(client, part: dict):
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": [part, {"type": "text", "text": "what is this"}]}],
        max_tokens=2,
        temperature=0,
    )


@pytest.fixture(scope="module", params=["qwen2_5_vl", "qwen3_vl"])
def video_client(request, media_dir, tmp_path_factory):
    """The shared Qwen2.5-VL server's client, or one of a Qwen3-VL server with the same limits."""
    if request.param == "qwen2_5_vl":
        yield request.getfixturevalue("client")
        return
    checkpoint = build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "qwen3_vl", "qwen3_vl")
    args = ["--model", str(checkpoint), "--served-model-name", MODEL_NAME, "--layout", "1E+1P+1D"]
    args += ["--max-model-len", "1024", "--allowed-local-media-path", str(media_dir)]
    log = tmp_path_factory.mktemp("logs") / "qwen3_vl_hostile.log"
    server = ServerProcess(args, log, api_key=API_KEY).start()
    yield openai.OpenAI(base_url=server.url + "/v1", api_key=API_KEY, timeout=120, max_retries=0)
    assert server.stop() == 0, server.log()[-3000:]


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


def test_ten_thousand_frames_refused_from_the_header(video_client):
    # The front end decodes no frame (and the encoder only the sampled ones, at most 768): the
    # 10k frames over the 4096 limit are refused from the header.
    frames = [noise_image(16, 16, seed=0)] * 10_000
    data = encode_video(frames, 25, kind=MP4)
    assert_refused(video_client, video(video_url(data)), "10000 frames, over the limit of 4096")


def test_truncated_mp4_refused_from_the_header(video_client, clip_mp4):
    cut = clip_mp4[: len(clip_mp4) // 2]
    assert_refused(video_client, video(video_url(cut)), "cannot read the video header")


def test_truncated_matroska_fails_where_it_is_decoded(video_client):
    data = encode_video(noise_clip(12, seed=32), 4)
    cut = video_url(data[: len(data) // 2], "video/x-matroska")
    assert_refused(video_client, video(cut), "truncated or corrupt")


def test_video_where_an_image_is_expected(video_client, clip_mp4):
    as_image = {"type": "image_url", "image_url": {"url": video_url(clip_mp4, "image/png")}}
    assert_refused(video_client, as_image, "not an image")
    as_video_type = {"type": "image_url", "image_url": {"url": video_url(clip_mp4)}}
    assert_refused(video_client, as_video_type, "not an image")


def test_image_where_a_video_is_expected(video_client):
    png = encode_image(noise_image(64, 48, seed=3), "PNG")
    assert_refused(video_client, video(data_url(png)), "not a video")
    assert_refused(video_client, video(video_url(png)), "not a video in a supported container")


def test_media_policy_applies_to_video_urls(video_client, media_dir):
    assert_refused(video_client, video("http://example.com/clip.mp4"), "remote")
    assert_refused(video_client, video(str(media_dir.parent / "outside.mp4")), "outside the allowed media")
    assert_refused(video_client, video("ftp://host/clip.mp4"), "unsupported")


def test_server_still_serves_video_after_the_refusals(video_client, clip_mp4):
    reply = ask(video_client, video(video_url(clip_mp4)))
    assert reply.choices[0].finish_reason in ("stop", "length")
