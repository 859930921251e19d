"""`epd serve` (the shared 1E+1P+1D Qwen2.5-VL server) takes video through the openai client:
`video_url` parts as data URLs and as allowed local files, alone and beside an image. The front
end sizes the video from its container header; the encoder instance decodes the sampled frames.
The answer is transformers' own, token for token (the clips are lossless, so the frames the
encoder decodes are those written: tests/inputs/test_video_file.py)."""

from __future__ import annotations

import base64

import pytest
import torch

from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.patches import with_pixels
from epd.inputs.processor import InputProcessor
from epd.inputs.video import VideoOptions, process_video_frames
from epd.testing.images import noise_image
from epd.testing.reference import hf_greedy, load_hf_model
from epd.testing.videos import encode_video, noise_clip

from .conftest import MODEL_NAME
from .helpers import data_url, encode_image

pytest.importorskip("av")

MAX_TOKENS = 8
QUESTION = {"type": "text", "text": "What happens in this clip?"}


def video_data_url(data: bytes) -> str:
    return "data:video/x-matroska;base64," + base64.b64encode(data).decode()


def ask(client, parts: list[dict]):
    return client.chat.completions.create(
        model=MODEL_NAME,
        messages=[{"role": "user", "content": [*parts, QUESTION]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    ).model_dump()


def expected_tokens(model: str, prompt_ids: list[int], image, frames: list) -> list[int]:
    """transformers' greedy answer: the clip as its 6 sampled frames (12 at 4 fps, sampled at 2
    fps: every other one, 1 s per temporal patch), the image as the image processor makes it."""
    cfg = ImageProcessorConfig.from_pretrained(model)
    video = process_video_frames(frames[::2], cfg, VideoOptions(tokens_per_second=4), fps=2)
    mm = {
        "pixel_values_videos": video.pixel_values,
        "video_grid_thw": torch.tensor([video.grid_thw]),
        "second_per_grid_ts": torch.tensor([1.0]),
    }
    if image is not None:
        processor = InputProcessor.from_pretrained(model)
        [item] = processor.load_images([image])
        mm["pixel_values"] = with_pixels(item, cfg).pixel_values
        mm["image_grid_thw"] = torch.tensor([item.grid_thw])
    expected, _ = hf_greedy(load_hf_model(model), prompt_ids, MAX_TOKENS, **mm)
    return expected


def test_video_data_url_gives_transformers_answer(client, model):
    frames = noise_clip(12, seed=21)
    body = ask(client, [{"type": "video_url", "video_url": {"url": video_data_url(encode_video(frames, 4))}}])
    processor = InputProcessor.from_pretrained(model)
    video_id = processor.token_ids.video_token_id
    assert body["prompt_token_ids"].count(video_id) == 3 * 2 * 3  # grid (3, 4, 6), 2x2 merged
    assert body["choices"][0]["token_ids"] == expected_tokens(model, body["prompt_token_ids"], None, frames)


def test_local_video_file_beside_an_image(client, model, media_dir):
    frames = noise_clip(12, seed=22)
    (media_dir / "clip.mkv").write_bytes(encode_video(frames, 4))
    png = encode_image(noise_image(70, 90, seed=23), "PNG")
    image_part = {"type": "image_url", "image_url": {"url": data_url(png)}}
    video_part = {"type": "video_url", "video_url": {"url": str(media_dir / "clip.mkv")}}
    body = ask(client, [image_part, video_part])
    expected = expected_tokens(model, body["prompt_token_ids"], png, frames)
    assert body["choices"][0]["token_ids"] == expected
