"""`epd serve` of a Qwen3-VL checkpoint in 1E+1P+1D through the openai client: images (image_url
data URLs of two aspect ratios) and a video (a video_url data URL of a lossless 12-frame clip).
The prompt is transformers' (its chat template, its image pad counts, its video text with each
temporal group after its time) and the answer is transformers' own, token for token.

Images: the pixels are transformers' image processor's (Qwen2VLImageProcessorPil). Video:
transformers' video processor needs torchvision, which is not installed, so its pixels are epd's
`process_timed_video` of the frames transformers samples (tests/models/test_qwen3_vl_video_vs_hf.py
checks sampling and sizes against transformers' functions); the clip is lossless, so the frames
the server decodes are those written.
"""

from __future__ import annotations

import base64

import openai
import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from epd.inputs.video import VideoOptions, process_timed_video
from epd.inputs.video_sources import video_processor_config
from epd.testing.checkpoints import build_tiny_checkpoint
from epd.testing.images import noise_image
from epd.testing.qwen3_reference import VIDEO_PAD, expand_image_pads, hf_video_text
from epd.testing.reference import hf_greedy, load_hf_model
from epd.testing.videos import encode_video, noise_clip

from .helpers import ServerProcess, png_data_url

ARGS = ["--layout", "1E+1P+1D", "--max-model-len", "1024", "--num-kv-blocks", "512"]
MAX_TOKENS = 8
VIDEO_FPS = 4.0
# 12 frames at 4 fps: transformers' Qwen3VLVideoProcessor samples 2 a second, first to last frame.
SAMPLED = [0, 2, 4, 7, 9, 11]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "qwen3_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def client(checkpoint, tmp_path_factory):
    log = tmp_path_factory.mktemp("logs") / "qwen3_vl_serve.log"
    server = ServerProcess(["--model", str(checkpoint), *ARGS], log).start()
    yield openai.OpenAI(base_url=server.url + "/v1", api_key="none", timeout=120, max_retries=0)
    assert server.stop() == 0, server.log()[-3000:]


@pytest.fixture(scope="module")
def hf(checkpoint):
    return load_hf_model(checkpoint)


def ask(client, checkpoint, parts: list[dict], question: dict) -> dict:
    return client.chat.completions.create(
        model=str(checkpoint),
        messages=[{"role": "user", "content": [*parts, question]}],
        max_tokens=MAX_TOKENS,
        temperature=0,
        extra_body={"return_token_ids": True},
    ).model_dump()


def hf_chat_text(checkpoint, kind: str, count: int, question: dict) -> str:
    """transformers' chat template over `count` parts of `kind` ("image" or "video") and the text."""
    tokenizer = AutoTokenizer.from_pretrained(checkpoint)
    messages = [{"role": "user", "content": [*[{"type": kind}] * count, question]}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)


def test_images_give_transformers_answer(client, checkpoint, hf):
    images = [noise_image(300, 100, seed=1), noise_image(90, 200, seed=2)]
    question = {"type": "text", "text": "What is different between these?"}
    parts = [{"type": "image_url", "image_url": {"url": png_data_url(img)}} for img in images]
    body = ask(client, checkpoint, parts, question)
    inputs = Qwen2VLImageProcessorPil.from_pretrained(checkpoint)(images, return_tensors="pt")
    grids = [tuple(g) for g in inputs["image_grid_thw"].tolist()]
    assert grids[0][2] > grids[0][1] and grids[1][1] > grids[1][2]  # one wide, one tall
    text = expand_image_pads(hf_chat_text(checkpoint, "image", 2, question), grids, 2)
    ids = AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"]
    assert body["prompt_token_ids"] == ids
    mm = {"pixel_values": inputs["pixel_values"], "image_grid_thw": inputs["image_grid_thw"]}
    expected, _ = hf_greedy(hf, ids, MAX_TOKENS, **mm)
    assert body["choices"][0]["token_ids"] == expected


def test_video_gives_transformers_answer(client, checkpoint, hf):
    frames = noise_clip(12, seed=4)
    url = "data:video/x-matroska;base64," + base64.b64encode(encode_video(frames, VIDEO_FPS)).decode()
    question = {"type": "text", "text": "What happens in this clip?"}
    body = ask(client, checkpoint, [{"type": "video_url", "video_url": {"url": url}}], question)
    cfg = video_processor_config(checkpoint)
    video = process_timed_video(
        [frames[i] for i in SAMPLED], cfg, VideoOptions(timestamps=True), VIDEO_FPS, SAMPLED
    )
    _, h, w = video.groups[0].grid_thw
    grid = (len(video.groups), h, w)
    assert grid == (3, 4, 6)
    video_text = hf_video_text(grid, VIDEO_FPS, SAMPLED, cfg.merge_size, cfg.temporal_patch_size)
    text = hf_chat_text(checkpoint, "video", 1, question).replace(VIDEO_PAD, video_text)
    ids = AutoTokenizer.from_pretrained(checkpoint)(text)["input_ids"]
    assert body["prompt_token_ids"] == ids
    mm = {
        "pixel_values_videos": torch.cat([g.pixel_values for g in video.groups]),
        "video_grid_thw": torch.tensor([grid]),
    }
    expected, _ = hf_greedy(hf, ids, MAX_TOKENS, **mm)
    assert body["choices"][0]["token_ids"] == expected
