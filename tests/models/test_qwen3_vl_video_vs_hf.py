"""Video for Qwen3-VL, token-exact against transformers in 1EPD, 1E+1P+1D and 2E+1P+1D.

Qwen3-VL writes each temporal group of a video after its time in text and places it in M-RoPE as
an image of grid (1, h, w); epd makes each group an item of its own (epd.inputs.video). The
prompt text and sizes are checked against transformers' own functions (its video processor needs
torchvision to run whole, which the tests do without); the model run against transformers'
`generate` with `pixel_values_videos` (epd's pixels, as tests/models/test_video_vs_hf.py does),
`video_grid_thw` of the whole video and `mm_token_type_ids` (2 at video rows: hf_greedy).
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoTokenizer
from transformers.models.qwen3_vl.processing_qwen3_vl import Qwen3VLProcessor
from transformers.models.qwen3_vl.video_processing_qwen3_vl import Qwen3VLVideoProcessor, smart_resize
from transformers.video_utils import VideoMetadata

from epd import LLM, SamplingParams
from epd.inputs.errors import InvalidInputError
from epd.inputs.image_processor import ImageProcessorConfig
from epd.inputs.processor import InputLimits, InputProcessor
from epd.inputs.types import ProcessedPrompt
from epd.inputs.video import group_seconds, qwen3_video_size
from epd.inputs.video_file import VideoHeader, qwen3_sample_indices
from epd.lifetime import Event
from epd.testing.checkpoints import QWEN3_PREPROCESSOR
from epd.testing.images import noise_image
from epd.testing.qwen3_reference import hf_video_text
from epd.testing.reference import assert_logprobs_match, hf_greedy, load_hf_model
from epd.testing.videos import encode_video, noise_clip

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO = "<|vision_start|><|video_pad|><|vision_end|>"
GREEDY = SamplingParams(temperature=0, max_tokens=8, logprobs=3)
CFG = ImageProcessorConfig.from_dict(QWEN3_PREPROCESSOR)
FPS = 3.0


def user_prompt(text: str, images: int = 0) -> str:
    return f"<|im_start|>user\n{IMAGE * images}{VIDEO}{text}<|im_end|>\n<|im_start|>assistant\n"


def requests() -> list[dict]:
    """12 frames (6 groups, each under its own time); 16 larger frames whose pixel budget counts
    every frame (smart_resize scales them down) after an image."""
    return [
        {
            "prompt": user_prompt("What happens in this clip?"),
            "multi_modal_data": {"video": (noise_clip(12, seed=1), {"fps": FPS})},
        },
        {
            "prompt": user_prompt("Compare the picture with the clip.", images=1),
            "multi_modal_data": {
                "image": noise_image(90, 70, seed=5),
                "video": [(noise_clip(16, 200, 150, seed=2), {"fps": FPS})],
            },
        },
    ]


def transformers_video_text(grid: tuple[int, int, int], fps: float, indices: list[int]) -> str:
    """What `Qwen3VLProcessor.replace_video_token` writes for a video's pad."""
    return hf_video_text(grid, fps, indices, CFG.merge_size, CFG.temporal_patch_size)


def video_groups(prompt: ProcessedPrompt) -> list[int]:
    return [i for i, item in enumerate(prompt.images) if item.is_video]


def reference_inputs(prompt: ProcessedPrompt, videos: list[int]) -> dict[str, torch.Tensor]:
    """transformers' inputs: images as they are, each video whole (its groups' rows joined, its
    grid t = the group count); `videos[k]` is the number of groups of video k."""
    images = [item for item in prompt.images if not item.is_video]
    groups = [item for item in prompt.images if item.is_video]
    mm: dict[str, torch.Tensor] = {}
    if images:
        mm["pixel_values"] = torch.cat([img.pixel_values for img in images])
        mm["image_grid_thw"] = torch.tensor([img.grid_thw for img in images])
    mm["pixel_values_videos"] = torch.cat([g.pixel_values for g in groups])
    grids, first = [], 0
    for count in videos:
        _, h, w = groups[first].grid_thw
        grids.append((count, h, w))
        first += count
    mm["video_grid_thw"] = torch.tensor(grids)
    return mm


@pytest.fixture(scope="module")
def hf(qwen3_checkpoint):
    return load_hf_model(qwen3_checkpoint)


@pytest.fixture(scope="module")
def references(hf) -> dict:
    return {}


def check_against_hf(llm: LLM, hf, references: dict, prompts: list, outputs: list) -> None:
    for i, (prompt, out) in enumerate(zip(prompts, outputs, strict=True)):
        processed = llm.processor.process_prompt(prompt)
        assert out.prompt_token_ids == processed.prompt_token_ids
        if i not in references:
            num_groups = len(video_groups(processed))
            references[i] = hf_greedy(
                hf, processed.prompt_token_ids, GREEDY.max_tokens, **reference_inputs(processed, [num_groups])
            )
        expected, logprobs = references[i]
        got = out.outputs[0]
        assert got.token_ids == expected, f"prompt {i}"
        assert_logprobs_match(got.logprobs, expected, logprobs)


# ---- the prompt, sizes and sampling: transformers' own functions -------------------------------


@pytest.mark.parametrize(
    ("frames", "height", "width"),
    [(8, 56, 84), (16, 150, 200), (9, 20, 700), (2, 1000, 1000), (768, 300, 400), (5, 31, 33)],
)
def test_frame_size_is_transformers_smart_resize(frames, height, width):
    expected = smart_resize(frames, height, width, 2, CFG.factor, CFG.min_pixels, CFG.max_pixels)
    assert qwen3_video_size(frames, height, width, CFG) == expected


@pytest.mark.parametrize(("total", "fps"), [(12, 4.0), (300, 30.0), (7, 24.0), (5000, 25.0), (3, 1.0)])
def test_file_sampling_is_transformers_sample_frames(total, fps):
    processor = Qwen3VLVideoProcessor.__new__(Qwen3VLVideoProcessor)
    processor.fps, processor.min_frames, processor.max_frames = 2, 4, 768
    expected = Qwen3VLVideoProcessor.sample_frames(processor, VideoMetadata(total_num_frames=total, fps=fps))
    assert qwen3_sample_indices(VideoHeader(total, fps, 64, 64)) == expected.tolist()


@pytest.mark.parametrize("indices", [list(range(8)), list(range(7)), [0, 3, 5, 9, 12]])
def test_group_times_are_transformers_timestamps(indices):
    expected = Qwen3VLProcessor._calculate_timestamps(None, list(indices), 2.5, 2)
    assert group_seconds(indices, 2.5, 2) == expected


def test_prompt_is_transformers_processor_text(qwen3_checkpoint):
    tokenizer = AutoTokenizer.from_pretrained(qwen3_checkpoint)
    # 7 frames without an fps: the last group padded, 24 fps assumed (as transformers' default).
    odd = {"prompt": user_prompt("And this?"), "multi_modal_data": {"video": (noise_clip(7, 60, 100), {})}}
    with LLM(str(qwen3_checkpoint)) as llm:
        for request in [*requests(), odd]:
            processed = llm.processor.process_prompt(request)
            groups = [processed.images[i] for i in video_groups(processed)]
            video = request["multi_modal_data"]["video"]
            frames, meta = video[0] if isinstance(video, list) else video
            size = qwen3_video_size(len(frames), frames[0].height, frames[0].width, CFG)
            grid = (len(groups), size[0] // CFG.patch_size, size[1] // CFG.patch_size)
            assert [g.grid_thw for g in groups] == [(1, *grid[1:])] * grid[0]
            images = [item for item in processed.images if not item.is_video]
            text = request["prompt"].replace(
                "<|image_pad|>", "".join("<|image_pad|>" * img.num_tokens(2) for img in images)
            )
            text = text.replace(
                "<|video_pad|>", transformers_video_text(grid, meta.get("fps", 24), list(range(len(frames))))
            )
            assert processed.prompt_token_ids == tokenizer(text)["input_ids"]


def test_chat_video_part_is_the_same_prompt(qwen3_checkpoint):
    frames = noise_clip(8, seed=9)
    messages = [
        {
            "role": "user",
            "content": [{"type": "video", "video": frames}, {"type": "text", "text": "What happens?"}],
        }
    ]
    processor = InputProcessor.from_pretrained(qwen3_checkpoint)
    chat = processor.process_chat(messages)
    prompt = {"prompt": chat.prompt, "multi_modal_data": {"video": frames}}
    assert chat.prompt_token_ids == processor.process_prompt(prompt).prompt_token_ids
    assert [item.grid_thw for item in chat.images] == [(1, 4, 6)] * 4


def test_one_frame_and_too_many_frames_are_refused(qwen3_checkpoint):
    processor = InputProcessor.from_pretrained(qwen3_checkpoint, limits=InputLimits(max_video_frames=16))
    for frames, message in [(1, "at least 2 frames"), (17, "over the limit of 16")]:
        prompt = {"prompt": user_prompt("?"), "multi_modal_data": {"video": noise_clip(frames)}}
        with pytest.raises(InvalidInputError, match=message):
            processor.process_prompt(prompt)


# ---- generation in every layout ----------------------------------------------------------------


@pytest.mark.parametrize("layout", ["1EPD", "1E+1P+1D", "2E+1P+1D"])
def test_video_matches_transformers(qwen3_checkpoint, hf, references, layout):
    prompts = requests()
    with LLM(str(qwen3_checkpoint), layout=layout, max_model_len=1024, num_kv_blocks=512) as llm:
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        check_against_hf(llm, hf, references, prompts, outputs)
        if layout.startswith("2E"):
            # The video's temporal groups, each an item, spread over both encoders.
            groups = video_groups(llm.processor.process_prompt(prompts[0]))
            encoders = {
                e.instance
                for e in outputs[0].metrics.events
                if e.event is Event.ENCODE_START and e.item in groups
            }
            assert len(encoders) == 2, encoders


@pytest.fixture(scope="module")
def file_reference(hf, qwen3_checkpoint) -> dict:
    """A lossless 12-frame file at 4 fps: transformers samples 6 (2 a second) at indices 0 2 4 7
    9 11, their times in the prompt; its answer, from the pixels of those frames given as such."""
    frames = noise_clip(12, seed=4)
    prompt = {
        "prompt": user_prompt("What moves?"),
        "multi_modal_data": {"video": encode_video(frames, fps=4)},
    }
    indices = [0, 2, 4, 7, 9, 11]
    same = {"prompt": prompt["prompt"], "multi_modal_data": {"video": [frames[i] for i in indices]}}
    text = prompt["prompt"].replace("<|video_pad|>", transformers_video_text((3, 4, 6), 4.0, indices))
    ids = AutoTokenizer.from_pretrained(qwen3_checkpoint)(text)["input_ids"]
    expected = InputProcessor.from_pretrained(qwen3_checkpoint).process_prompt(same)
    answer = hf_greedy(hf, ids, GREEDY.max_tokens, **reference_inputs(expected, [3]))
    return {"prompt": prompt, "ids": ids, "frames_prompt": expected, "answer": answer}


@pytest.mark.parametrize("layout", ["1EPD", "1E+1P+1D", "2E+1P+1D"])
def test_video_file_decoded_where_its_groups_are_encoded(qwen3_checkpoint, file_reference, layout):
    """The front end reads the file's header only: each group's item names the file (no pixels);
    the encoding side (this process in 1EPD, the encoder instances else) decodes it into the
    pixels of the sampled frames, and the answer is transformers' on those frames."""
    pytest.importorskip("av")
    prompt = file_reference["prompt"]
    with LLM(str(qwen3_checkpoint), layout=layout) as llm:
        processed = llm.processor.process_prompt(prompt)
        assert processed.prompt_token_ids == file_reference["ids"]
        groups = [processed.images[i] for i in video_groups(processed)]
        assert [g.grid_thw for g in groups] == [(1, 4, 6)] * 3
        assert all(g.pixel_values is None and g.raw_patches is None for g in groups)
        assert [g.encoded.group for g in groups] == [0, 1, 2]
        assert len({id(g.encoded.file) for g in groups}) == 1, "one file, shared by its groups"
        expected = file_reference["frames_prompt"]
        want = [expected.images[i] for i in video_groups(expected)]
        assert [g.content_hash for g in groups] != [w.content_hash for w in want], "keyed by the file"
        [out] = llm.generate([prompt], GREEDY, use_tqdm=False)
        assert out.error is None, out.error
        assert out.prompt_token_ids == file_reference["ids"]
        tokens, logprobs = file_reference["answer"]
        assert out.outputs[0].token_ids == tokens
        assert_logprobs_match(out.outputs[0].logprobs, tokens, logprobs)
        if layout.startswith("2E"):  # the file's groups spread over both encoders
            encoders = {
                e.instance for e in out.metrics.events if e.event is Event.ENCODE_START and e.item in range(3)
            }
            assert len(encoders) == 2, encoders
