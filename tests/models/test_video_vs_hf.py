"""Video (a list of frames) for Qwen2-VL and Qwen2.5-VL, token-exact against transformers.

The reference is transformers' `generate` with `pixel_values_videos`, `video_grid_thw` and (2.5)
`second_per_grid_ts` on the same tiny random checkpoints, CPU fp32 greedy; the pixel values are
epd's (transformers' video processor needs torchvision: tests/inputs/test_video.py checks our
patch layout against its image processor instead). So this checks the tower on t > 1 grids, the
`<|video_pad|>` expansion, the M-RoPE time rows (Qwen2.5-VL's tokens_per_second scaling at a fps
that makes the interval fractional) and the decode delta, in every layout.
"""

from __future__ import annotations

import pytest
import torch

from epd import LLM, SamplingParams
from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.patches import with_pixels
from epd.inputs.types import ProcessedPrompt
from epd.testing.checkpoints import PREPROCESSOR
from epd.testing.images import noise_image
from epd.testing.reference import assert_logprobs_match, hf_greedy, load_hf_model
from epd.testing.videos import encode_video, noise_clip

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0, max_tokens=10, logprobs=3)
CFG = ImageProcessorConfig.from_dict(PREPROCESSOR)
FPS = 3.0  # Qwen2.5-VL: 4 tokens/s * 2/3 s per temporal patch = 2.67, times 0, 2, 5, 8


def clip(num_frames: int = 8, width: int = 84, height: int = 56, seed: int = 0) -> list:
    return [noise_image(width, height, seed=seed * 100 + i) for i in range(num_frames)]


def video_prompt(text: str, *, images: int = 0, videos: int = 1) -> str:
    return f"<|im_start|>user\n{IMAGE * images}{VIDEO * videos}{text}<|im_end|>\n<|im_start|>assistant\n"


def reference_inputs(prompt: ProcessedPrompt, family: str, seconds: float) -> dict[str, torch.Tensor]:
    """transformers' keyword inputs for the prompt's images and videos, `seconds` per temporal
    patch (Qwen2-VL has no time scaling: it takes no `second_per_grid_ts`). A file's pixels are
    those the encoding side decodes (tests/inputs/test_video_file.py: its sampled frames')."""
    items = [with_pixels(item, CFG) for item in prompt.images]
    images = [item for item in items if not item.is_video]
    videos = [item for item in items if item.is_video]
    mm: dict[str, torch.Tensor] = {}
    if images:
        mm["pixel_values"] = torch.cat([img.pixel_values for img in images])
        mm["image_grid_thw"] = torch.tensor([img.grid_thw for img in images])
    if videos:
        mm["pixel_values_videos"] = torch.cat([v.pixel_values for v in videos])
        mm["video_grid_thw"] = torch.tensor([v.grid_thw for v in videos])
        if family == "qwen2_5_vl":
            mm["second_per_grid_ts"] = torch.tensor([seconds] * len(videos))
    return mm


def assert_matches_hf(llm: LLM, hf, prompts: list, outputs: list, seconds: float = 2 / FPS) -> None:
    for prompt, out in zip(prompts, outputs, strict=True):
        processed = llm.processor.process_prompt(prompt)
        assert out.prompt_token_ids == processed.prompt_token_ids
        expected, logprobs = hf_greedy(
            hf,
            processed.prompt_token_ids,
            GREEDY.max_tokens,
            **reference_inputs(processed, hf.config.model_type, seconds),
        )
        got = out.outputs[0]
        assert got.token_ids == expected
        assert_logprobs_match(got.logprobs, expected, logprobs)


@pytest.fixture
def hf(checkpoint):
    return load_hf_model(checkpoint)


def requests() -> list:
    frames = clip(8, seed=1)
    mixed = [noise_image(70, 90, seed=5)], clip(8, width=60, height=100, seed=2)
    return [
        {"prompt": video_prompt("What happens?"), "multi_modal_data": {"video": (frames, {"fps": FPS})}},
        {
            "prompt": video_prompt("Compare them.", images=1),
            "multi_modal_data": {"image": mixed[0], "video": [(mixed[1], {"fps": FPS})]},
        },
    ]


# Every layout on one family at least: the M-RoPE time step travels with the prefill task and the
# KV hand-off, so 2E+1P+1D runs on Qwen2.5-VL, whose step is fractional. There each video is also
# cut in two chunks of temporal groups, one per encoder (IRP: tests/cluster/test_video_irp.py).
LAYOUTS = [
    ("qwen2_vl", "1EPD"),
    ("qwen2_5_vl", "1EPD"),
    ("qwen2_vl", "1E+1P+1D"),
    ("qwen2_5_vl", "2E+1P+1D"),
]


@pytest.mark.parametrize(("family", "layout"), LAYOUTS)  # overrides the `family` fixture
def test_video_and_mixed_request_match_transformers(checkpoint, hf, layout):
    prompts = requests()
    with LLM(str(checkpoint), layout=layout) as llm:
        processed = llm.processor.process_prompt(prompts[0])
        assert [item.grid_thw for item in processed.images] == [(4, 4, 6)]
        assert processed.prompt_token_ids.count(llm.processor.token_ids.video_token_id) == 4 * 2 * 3
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        assert_matches_hf(llm, hf, prompts, outputs)


def test_odd_frame_count_repeats_the_last_frame(checkpoint, hf):
    # 7 frames: transformers pads the last temporal patch with a copy of frame 7.
    prompt = {
        "prompt": video_prompt("And now?"),
        "multi_modal_data": {"video": (clip(7, seed=3), {"fps": FPS})},
    }
    with LLM(str(checkpoint)) as llm:
        [item] = llm.processor.process_prompt(prompt).images
        assert item.grid_thw == (4, 4, 6)
        outputs = llm.generate([prompt], GREEDY, use_tqdm=False)
        assert_matches_hf(llm, hf, [prompt], outputs)


@pytest.mark.parametrize("family", ["qwen2_5_vl"])
def test_video_file_decoded_by_the_encoder_instance(checkpoint, hf):
    """12 frames at 4 fps, sampled at 2 fps: 6 frames, 1 s per temporal patch; the E instance
    decodes the file (a lossless one, so the pixels are the frames'), P and D never see it."""
    pytest.importorskip("av")
    data = encode_video(noise_clip(12, seed=4), fps=4)
    prompt = {"prompt": video_prompt("What moves?"), "multi_modal_data": {"video": data}}
    with LLM(str(checkpoint), layout="1E+1P+1D") as llm:
        [item] = llm.processor.process_prompt(prompt).images
        assert item.encoded == data and item.grid_thw == (3, 4, 6)
        outputs = llm.generate([prompt], GREEDY, use_tqdm=False)
        assert_matches_hf(llm, hf, [prompt], outputs, seconds=1.0)
