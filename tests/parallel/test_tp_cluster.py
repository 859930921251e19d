"""Tensor-parallel instances in a cluster (`@tpN` layouts, the local launcher): an instance process
(rank 0) and its workers, over gloo on the CPU. Greedy, fp32, tiny Qwen2.5-VL: the same tokens as
the in-process `1EPD` at tp1, logprobs within 1e-4, on a text and an image prompt; and no worker
outlives its instance, whether the instance exits or is killed."""

from __future__ import annotations

import os
import signal
import time

import pytest
from transformers import AutoConfig

from epd import LLM, SamplingParams
from epd.cluster.launcher import LocalGroup
from epd.testing.images import noise_image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = [
    {"prompt_token_ids": list(range(10, 41))},
    {
        "prompt": f"<|im_start|>user\n{IMAGE}describe the two people<|im_end|>\n<|im_start|>assistant\n",
        "multi_modal_data": {"image": [noise_image(120, 90, seed=3)]},
    },
]
PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=2, ignore_eos=True)
EXIT_WAIT_S = 60.0  # a bound on waiting for a process to end, not a guess at how long it takes


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def reference(model):
    with LLM(model) as llm:  # in process, one device
        return llm.generate(PROMPTS, PARAMS, use_tqdm=False)


def assert_same(outputs, reference) -> None:
    for out, ref in zip(outputs, reference, strict=True):
        assert out.error is None, out.error
        got, want = out.outputs[0], ref.outputs[0]
        assert got.token_ids == want.token_ids
        for position, ref_position in zip(got.logprobs, want.logprobs, strict=True):
            assert position.keys() == ref_position.keys()
            assert all(abs(position[t].logprob - ref_position[t].logprob) < 1e-4 for t in position)


def tp_group(llm: LLM, name: str) -> LocalGroup:
    group = llm.engine.launched[name]
    assert isinstance(group, LocalGroup) and len(group.processes) == 2
    return group


def test_an_aggregated_tp2_instance_generates_what_tp1_does_and_its_workers_die_with_it(model, reference):
    with LLM(model, layout="1EPD@tp2") as llm:
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), reference)
        group = tp_group(llm, "EPD0")
        os.kill(group.pid, signal.SIGKILL)  # the instance dies without a word to its worker
        [worker] = group.workers
        worker.join(EXIT_WAIT_S)
        assert worker.exitcode == 0  # ended by its lifeline, nobody killed it


def test_an_encoder_split_over_two_ranks_encodes_what_one_device_does(model, reference):
    """`1E@tp2`: the E instance's tower split by heads and MLP columns over two processes, every
    rank encoding each batch; the request's tokens are one device's."""
    with LLM(model, layout="1E@tp2+1P+1D") as llm:
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), reference)
        group = tp_group(llm, "E0")
        assert reported(llm, "E0", "images_encoded_total", 1) == 1
    for process in group.processes:
        process.join(EXIT_WAIT_S)
        assert process.exitcode == 0


def test_async_scheduling_over_tp2_workers_gives_the_sync_tokens_and_overlaps(model, reference):
    """Decode steps launched from ids still on rank 0's device: the workers get them by a
    broadcast, and every rank runs the step tp1 runs synchronously."""
    with LLM(model, layout="1EPD@tp2", async_scheduling=True) as llm:
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), reference)
        assert reported(llm, "EPD0", "overlapped_steps_total", 1) > 0


@pytest.mark.parametrize(
    "layout, parallel, kv_streaming, parts_per_layer",
    [
        # P tp2 -> D tp1: each of P's ranks sends its kv heads (each layer's, or the whole KV's)
        # from its own process; D assembles them
        ("1E+1P@tp2+1D", "P0", "layer", 2),
        ("1E+1P@tp2+1D", "P0", "request", 2),
        ("1E+1P+1D@tp2", "D0", "request", 0),  # P tp1 -> D tp2: the KV scattered to D's ranks
    ],
)
def test_kv_hand_off_between_degrees(model, reference, layout, parallel, kv_streaming, parts_per_layer):
    with LLM(model, layout=layout, kv_streaming=kv_streaming) as llm:
        assert_same(llm.generate(PROMPTS, PARAMS, use_tqdm=False), reference)
        group = tp_group(llm, parallel)
        layers = (
            1
            if kv_streaming == "request"
            else AutoConfig.from_pretrained(model).text_config.num_hidden_layers
        )
        parts = len(PROMPTS) * layers * parts_per_layer
        if parts:  # every piece came as a part of its own: none was gathered on P's rank 0
            assert parts_received(llm, "D0", parts) == parts
    for process in group.processes:  # the instance exited when told; its worker followed by itself
        process.join(EXIT_WAIT_S)
        assert process.exitcode == 0


def parts_received(llm: LLM, instance: str, expected: int) -> float:
    return reported(llm, instance, "kv_parts_received_total", expected)


def reported(llm: LLM, instance: str, stat: str, expected: float) -> float:
    """`instance`'s `stat`, once its reports reach `expected` (or, after a bound on waiting for a
    failure, whatever they say). Idle, the router reads instance stats only when polled."""
    end, got = time.monotonic() + EXIT_WAIT_S, 0.0
    while time.monotonic() < end and got < expected:
        llm.engine.poll_idle()
        got = llm.engine.instance_stats().get(instance, {}).get(stat, 0.0)
        time.sleep(0.05)
    return got
