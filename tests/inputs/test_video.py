"""Video frames -> one item (grid t > 1): patch layout against transformers' image processor,
placeholder expansion with images, time steps, and refusals of bad video input."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

from epd.inputs.errors import InvalidInputError
from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.processor import InputLimits, InputProcessor
from epd.inputs.video import NO_VIDEO, VideoOptions, process_video_frames, time_interval

from .helpers import random_image

VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
CFG = ImageProcessorConfig(min_pixels=56 * 56, max_pixels=28 * 28 * 64)


def frames(n: int, width: int = 100, height: int = 70, seed: int = 0) -> list:
    return [random_image(width, height, seed=seed * 1000 + i) for i in range(n)]


@pytest.mark.parametrize(("num_frames", "size"), [(4, (100, 70)), (5, (57, 83)), (2, (300, 90))])
def test_each_temporal_slice_is_the_image_processors_frame(num_frames, size):
    """Slice t of temporal patch g holds frame g * T + t exactly as transformers' image processor
    patchifies that frame alone (it repeats a still image T times); a missing last frame repeats."""
    clip = frames(num_frames, *size)
    item = process_video_frames(clip, CFG)
    hf = Qwen2VLImageProcessorPil(min_pixels=CFG.min_pixels, max_pixels=CFG.max_pixels)
    t, h, w = item.grid_thw
    assert t == -(-num_frames // 2)
    ours = item.pixel_values.view(t, h * w, 3, 2, 14 * 14)
    for index in range(2 * t):
        out = hf(images=clip[min(index, num_frames - 1)], return_tensors="pt")
        assert tuple(out["image_grid_thw"][0].tolist()) == (1, h, w)
        expected = out["pixel_values"].view(h * w, 3, 2, 14 * 14)[:, :, 0]
        assert torch.equal(ours[index // 2, :, :, index % 2], expected)


def test_raw_patches_expand_to_the_same_pixels():
    from epd.inputs.patches import with_pixels

    item = process_video_frames(frames(4), CFG)
    bare = type(item)(None, item.grid_thw, item.content_hash, raw_patches=item.raw_patches, modality="video")
    assert torch.equal(with_pixels(bare, CFG).pixel_values, item.pixel_values)


def test_time_interval_is_transformers_float32_product():
    qwen25 = VideoOptions(tokens_per_second=4)
    assert time_interval(2.0, CFG, qwen25) == 4.0
    assert time_interval(3.0, CFG, qwen25) == float(4 * torch.tensor(2 / 3.0))
    assert time_interval(3.0, CFG, VideoOptions()) == 1.0  # Qwen2-VL counts temporal patches


def test_key_depends_on_frames_order_and_fps():
    clip = frames(4)
    opts = VideoOptions(tokens_per_second=4)
    key = process_video_frames(clip, CFG, opts, fps=2).content_hash
    assert process_video_frames([f.copy() for f in clip], CFG, opts, fps=2).content_hash == key
    assert process_video_frames(clip[::-1], CFG, opts, fps=2).content_hash != key
    assert process_video_frames(clip, CFG, opts, fps=4).content_hash != key


def test_images_and_videos_expand_in_prompt_order(model_dir):
    proc = InputProcessor.from_pretrained(model_dir)
    image, clip = random_image(60, 60, seed=9), frames(4, seed=2)
    prompt = {
        "prompt": f"a{VIDEO}b{IMAGE}c{VIDEO}",
        "multi_modal_data": {
            "image": image,
            "video": [clip, (np.stack([np.asarray(f) for f in clip]), {"fps": 4})],
        },
    }
    out = proc.process_prompt(prompt)
    assert [item.modality for item in out.images] == ["video", "image", "video"]
    video_id, image_id = proc.token_ids.video_token_id, proc.token_ids.image_token_id
    for item, span in zip(out.images, out.placeholders, strict=True):
        ids = out.prompt_token_ids[span.offset : span.end]
        assert ids == [video_id if item.is_video else image_id] * item.num_tokens(2)
    assert out.images[0].time_interval == pytest.approx(4 * 2 / 24)  # no fps given: 24 fps
    assert out.images[2].time_interval == 2.0
    assert torch.equal(out.images[0].pixel_values, out.images[2].pixel_values)


@pytest.mark.parametrize(
    ("prompt", "video", "message"),
    [
        (VIDEO, None, "1 video placeholders but 0 videos"),
        ("text", [random_image(60, 60)], "0 video placeholders but 1 videos"),
        (VIDEO, [random_image(60, 60), random_image(70, 60)], "same size"),
        (VIDEO, [["not a frame"]], "list of PIL"),
        (VIDEO, 5, "a video must be"),
        (VIDEO, (frames(2), {"fps": -1}), "fps must be a positive"),
        (VIDEO, np.zeros((2, 8, 8), dtype=np.uint8), "uint8 \\[F, H, W, 3\\]"),
        (VIDEO, frames(9), "9 frames, over the limit of 8"),
    ],
)
def test_bad_video_input_is_refused(model_dir, prompt, video, message):
    proc = InputProcessor.from_pretrained(model_dir, limits=InputLimits(max_video_frames=8))
    mm = {} if video is None else {"video": video}
    with pytest.raises(InvalidInputError, match=message):
        proc.process_prompt({"prompt": prompt, "multi_modal_data": mm})


def test_a_model_without_video_refuses_it(model_dir):
    base = InputProcessor.from_pretrained(model_dir)
    proc = InputProcessor(base.tokenizer, base.image_config, base.token_ids, video=NO_VIDEO)
    with pytest.raises(InvalidInputError, match="does not take video"):
        proc.process_prompt({"prompt": VIDEO, "multi_modal_data": {"video": frames(2)}})
