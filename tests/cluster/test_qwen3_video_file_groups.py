"""A Qwen3-VL video file is decoded where its temporal groups are encoded, not on the front end.

Each group is an item of its own that names the file (epd.inputs.video_file.VideoFileGroup). The
front end reads the container header only; an encoder gets the file's bytes once per task however
many of its groups the task holds, and decodes it once for them; in process (1EPD) the file is
decoded once for all its groups. Decodes are counted at the container opens (`_open`: one for the
header, one per decode), the real path every read of a file takes.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from router_harness import make_core

from epd import SamplingParams
from epd.clock import VirtualClock
from epd.cluster.instance import InstanceConfig, InstanceCore, ListOutbox
from epd.cluster.layout import Layout
from epd.cluster.messages import (
    EncodeDone,
    EncodeFailed,
    EncodeTask,
    PrefillTask,
    decode_for_instance,
    encode,
    encode_frames,
)
from epd.cluster.pixel_decoder import PixelDecoder
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs import video_file
from epd.inputs.errors import InvalidInputError
from epd.inputs.patches import PatchPool, with_pixels
from epd.inputs.processor import InputProcessor
from epd.inputs.types import ProcessedPrompt
from epd.testing.checkpoints import build_tiny_checkpoint
from epd.testing.videos import encode_video, noise_clip
from epd.transfer.base import create_connector

pytest.importorskip("av")

PROMPT = "<|im_start|>user\n<|vision_start|><|video_pad|><|vision_end|>What moves?<|im_end|>\n"
# 24 lossless frames at 4 fps: Qwen3-VL samples 12 (2 a second), 6 temporal groups of 2.
FRAMES = noise_clip(24, seed=11)
SAMPLED = [0, 2, 4, 6, 8, 10, 13, 15, 17, 19, 21, 23]  # transformers' linspace(0, 23, 12), rounded
WAIT_S = 60.0  # a bound on waiting for the encoder, never a guess at how long it takes


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "qwen3_vl", "qwen3_vl")


@pytest.fixture(scope="module")
def processor(checkpoint) -> InputProcessor:
    return InputProcessor.from_pretrained(checkpoint)


@pytest.fixture(scope="module")
def data() -> bytes:
    return encode_video(FRAMES, fps=4)


@pytest.fixture(scope="module")
def frames_patches(processor) -> list[torch.Tensor]:
    """Each group's uint8 patches from the sampled frames given as frames (processed at once)."""
    same = {"prompt": PROMPT, "multi_modal_data": {"video": [FRAMES[i] for i in SAMPLED]}}
    return [item.raw_patches for item in processor.process_prompt(same).images]


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the containers opened from here on (a header read: one; a decode: one more)."""
    count = [0]
    real_open = video_file._open

    def counting_open(data):
        count[0] += 1
        return real_open(data)

    monkeypatch.setattr(video_file, "_open", counting_open)
    return count


def file_prompt(processor: InputProcessor, data: bytes) -> ProcessedPrompt:
    return processor.process_prompt({"prompt": PROMPT, "multi_modal_data": {"video": data}})


def test_the_front_end_reads_the_header_only(processor, data, opens):
    processed = file_prompt(processor, data)
    assert opens[0] == 1, "the header, read once: no frame decoded"
    assert [item.grid_thw for item in processed.images] == [(1, 4, 6)] * 6
    assert all(item.pixel_values is None and item.raw_patches is None for item in processed.images)
    assert [item.encoded.group for item in processed.images] == list(range(6))
    assert {item.encoded.file.data for item in processed.images} == {data}
    # A Matroska file cut short keeps its header: the front end takes it, its decoding refuses it.
    cut = file_prompt(processor, data[: len(data) // 2])
    with pytest.raises(InvalidInputError, match="truncated or corrupt"):
        with_pixels(cut.images[0], processor.image_config)


def test_in_process_the_file_is_decoded_once_for_all_its_groups(processor, data, frames_patches, opens):
    processed = file_prompt(processor, data)
    pool = PatchPool(2)
    try:
        made = pool.prepare(processed, processor.image_config)  # as the in-process engine does
    finally:
        pool.close()
    assert opens[0] == 1 + 2, "the front end's header, then one decode (its header and its frames)"
    for item, expected in zip(made.images, frames_patches, strict=True):
        assert torch.equal(item.raw_patches, expected)


def test_each_encoder_gets_the_file_once_and_decodes_it_once(processor, data, frames_patches, opens):
    core, _, _ = make_core("2E+1P+1D")
    sent = core.add_request("r", file_prompt(processor, data), SamplingParams(max_tokens=1))
    tasks = {o.instance: o.message for o in sent if isinstance(o.message, EncodeTask)}
    assert set(tasks) == {"E0", "E1"}, "the file's groups spread over both encoders"
    assert sorted(i.index for t in tasks.values() for i in t.items) == list(range(6))
    assert all(len(t.items) > 1 for t in tasks.values()), "several groups a task: one file for them"
    decoder = PixelDecoder(processor.image_config, torch.device("cpu"), PatchPool(2))
    try:
        for task in tasks.values():
            wire = encode(task)
            assert wire.count(data) == 1, "the file's bytes once per task, whatever its group count"
            frames = encode_frames(task)  # as the router sends it: the file a frame of its own, once
            assert [f for f in frames[1:] if f == data] == [data] and data not in frames[0]
            assert decode_for_instance(frames) == decode_for_instance(wire)
            received = decode_for_instance(wire)
            assert all(item.file == data and item.qwen3 for item in received.items)
            opens[0] = 0
            made = decoder.patches_of(received.items)
            for item, patches in zip(received.items, made, strict=True):
                assert torch.equal(patches.result(), frames_patches[item.index])
            assert opens[0] == 2, f"one decode for the task's {len(received.items)} groups"
    finally:
        decoder.pool.close()


def test_an_encoder_instance_decodes_the_groups_of_a_task_once(processor, checkpoint, data, opens):
    """E0's core, in process, takes the task as it comes off the wire: one decode, 6 groups encoded."""
    core, _, _ = make_core("1E+1P+1D")
    sent = core.add_request("r", file_prompt(processor, data), SamplingParams(max_tokens=1))
    [task] = [o.message for o in sent if isinstance(o.message, EncodeTask)]
    specs = {s.name: s for s in Layout.parse("1E+1P+1D").instances("cpu")}
    engine = EngineArgs(model=str(checkpoint), block_size=4, num_kv_blocks=64).engine_config()
    outbox = ListOutbox()
    with create_connector("shm", device="cpu") as e_link, create_connector("shm", device="cpu") as p_link:
        cfg = InstanceConfig(specs["E0"], engine, "inproc://no-router", "shm")
        encoder = InstanceCore(cfg, e_link, outbox, VirtualClock())
        opens[0] = 0
        encoder.on_message(decode_for_instance(encode(EncodeTask("r", task.items, p_link.address))))
        deadline = time.monotonic() + WAIT_S
        while sum(len(m.items) for m in outbox.messages if isinstance(m, EncodeDone)) < 6:
            assert time.monotonic() < deadline, outbox.messages
            encoder.step()
    assert opens[0] == 2, "one decode (its header and its frames) for the 6 groups"
    assert not [m for m in outbox.messages if isinstance(m, EncodeFailed)]


def test_an_encoding_prefill_instance_gets_the_file_once(processor, data):
    core, _, _ = make_core("1EP+1D")
    sent = core.add_request("r", file_prompt(processor, data), SamplingParams(max_tokens=1))
    [task] = [o.message for o in sent if isinstance(o.message, PrefillTask)]
    assert len(task.pixels) == 6
    wire = encode(task)
    assert wire.count(data) == 1
    assert all(item.file == data for item in decode_for_instance(wire).pixels)
    frames = encode_frames(task)
    assert len(frames) == 2 and frames[1] == data
    assert all(item.file == data for item in decode_for_instance(frames).pixels)
    assert all(item.file == data for item in task.pixels), "the sent task itself is left whole"


def test_a_bad_file_fails_every_group_of_the_task(processor, data):
    cut = file_prompt(processor, data[: len(data) // 2])
    core, _, _ = make_core("1E+1P+1D")
    sent = core.add_request("r", cut, SamplingParams(max_tokens=1))
    [task] = [o.message for o in sent if isinstance(o.message, EncodeTask)]
    decoder = PixelDecoder(processor.image_config, torch.device("cpu"), PatchPool(1))
    try:
        made = decoder.patches_of(decode_for_instance(encode(task)).items)
        for patches in made:
            with pytest.raises(InvalidInputError, match="truncated or corrupt"):
                patches.result()
    finally:
        decoder.pool.close()
