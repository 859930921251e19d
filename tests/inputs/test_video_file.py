"""Video files: the header gives the token count, the encoding side decodes the sampled frames.

Clips are encoded here with PyAV. The lossless ones (FFV1) decode to exactly the frames written,
so a file must give the very pixels of its sampled frames passed as a list. Expected frame picks
are worked by hand from transformers' `Qwen2VLVideoProcessor.sample_frames` with fps=2.
"""

from __future__ import annotations

import base64

import pytest

from epd.inputs.errors import InvalidInputError
from epd.inputs.patches import with_pixels
from epd.inputs.processor import InputLimits, InputProcessor
from epd.inputs.video import VideoOptions, process_video_frames
from epd.inputs.video_file import read_video_header, sample_indices
from epd.testing.videos import MP4, encode_video, noise_clip

pytest.importorskip("av")

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


@pytest.fixture(scope="module")
def clip() -> list:
    return noise_clip(12)


@pytest.fixture(scope="module")
def lossless(clip) -> bytes:
    return encode_video(clip, fps=4)


def video_request(video) -> dict:
    return {"prompt": f"look{VIDEO}", "multi_modal_data": {"video": video}}


@pytest.mark.parametrize(
    ("frames", "fps", "picks"),
    [
        (12, 4, [0, 2, 4, 6, 8, 10]),  # 3 s at 2 fps: 6 frames, every other one
        (3, 30, [0, 1]),  # 0.1 s: min_frames 4, cut to the 3 there are, floored to T = 2
        (1, 30, [0]),  # under one temporal patch: the frame, repeated by patchify
    ],
)
def test_sampling_follows_transformers(frames, fps, picks):
    header = read_video_header(encode_video(noise_clip(frames, 28, 28), fps=fps))
    assert (header.num_frames, header.fps, header.width, header.height) == (frames, fps, 28, 28)
    assert sample_indices(header, 2) == picks


def test_file_gives_the_pixels_of_its_sampled_frames(model_dir, clip, lossless):
    proc = InputProcessor.from_pretrained(model_dir)
    [item] = proc.process_prompt(video_request(lossless)).images
    assert item.pixel_values is None and item.encoded == lossless  # nothing decoded at the front end
    assert item.grid_thw == (3, 4, 6)
    assert item.time_interval == 4.0  # 6 of 12 frames at 4 fps: 2 fps, 1 s per temporal patch
    frames = [clip[i] for i in (0, 2, 4, 6, 8, 10)]
    expected = process_video_frames(frames, proc.image_config, VideoOptions(tokens_per_second=4), fps=2)
    assert with_pixels(item, proc.image_config).pixel_values.equal(expected.pixel_values)


def test_mp4_data_url_and_allowed_path(model_dir, tmp_path, clip):
    data = encode_video(clip[:8], fps=4, kind=MP4)
    (tmp_path / "clip.mp4").write_bytes(data)
    proc = InputProcessor.from_pretrained(
        model_dir, limits=InputLimits(allowed_local_media_path=str(tmp_path))
    )
    url = "data:video/mp4;base64," + base64.b64encode(data).decode()
    from_url = proc.process_prompt(video_request(url)).images[0]
    from_path = proc.process_prompt(video_request(str(tmp_path / "clip.mp4"))).images[0]
    assert from_url.content_hash == from_path.content_hash
    assert from_url.grid_thw == (2, 4, 6)  # 2 s at 2 fps
    outside = tmp_path.parent / "elsewhere.mp4"
    with pytest.raises(InvalidInputError):
        proc.process_prompt(video_request(str(outside)))
    with pytest.raises(InvalidInputError, match="not a video"):
        proc.process_prompt(video_request("data:image/png;base64," + base64.b64encode(data).decode()))


def test_truncated_files_are_refused(model_dir, clip, lossless):
    proc = InputProcessor.from_pretrained(model_dir)
    mp4 = encode_video(clip, fps=4, kind=MP4)
    with pytest.raises(InvalidInputError, match="video"):  # MP4 keeps its index at the end
        proc.process_prompt(video_request(mp4[: len(mp4) // 2]))
    # Matroska's header survives the cut: the front end accepts it, decoding finds the end early.
    [item] = proc.process_prompt(video_request(lossless[: len(lossless) // 2])).images
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        with_pixels(item, proc.image_config)


def test_video_where_an_image_is_expected_and_the_reverse(model_dir, lossless):
    proc = InputProcessor.from_pretrained(model_dir)
    with pytest.raises(InvalidInputError, match="not an image"):
        proc.process_prompt({"prompt": f"look{IMAGE}", "multi_modal_data": {"image": lossless}})
    png = base64.b64decode(
        "iVBORw0KGgoAAAANSUhEUgAAAAEAAAABCAIAAACQd1PeAAAADElEQVR4nGP4//8/AAX+Av4N70a4AAAAAElFTkSuQmCC"
    )
    with pytest.raises(InvalidInputError, match="not a video"):
        proc.process_prompt(video_request(png))


def test_frame_limit_is_checked_on_the_header(model_dir, lossless):
    proc = InputProcessor.from_pretrained(model_dir, limits=InputLimits(max_video_frames=8))
    with pytest.raises(InvalidInputError, match="12 frames, over the limit of 8"):
        proc.process_prompt(video_request(lossless))


def test_pixel_limit_is_checked_on_the_header(model_dir, lossless):
    proc = InputProcessor.from_pretrained(model_dir, limits=InputLimits(max_image_pixels=84 * 56 - 1))
    with pytest.raises(InvalidInputError, match="84x56 frames are empty or over the limit"):
        proc.process_prompt(video_request(lossless))
