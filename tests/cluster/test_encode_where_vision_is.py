"""With every encoder instance gone, images are encoded by an instance that prefills with the vision
tower at hand (EP), where the layout has one, instead of the requests failing.

Instance processes, 1E+1P+1EP+1D, E0 SIGKILLed and not restarted: requests with images go to EP0
(which encodes in-process), text-only ones anywhere; every answer equals the in-process engine's.
"""

from __future__ import annotations

import os
import signal
import time

from epd import LLM, SamplingParams
from epd.lifetime import Event
from epd.testing.images import noise_image

WAIT_S = 120.0  # a bound on each wait for a state, never a guess at how long work takes
IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"
PARAMS = SamplingParams(temperature=0, max_tokens=6)


def image_prompt(i: int) -> dict:
    n = 1 + i % 2
    text = f"<|im_start|>user\n{IMAGE * n}what is it {i}<|im_end|>\n<|im_start|>assistant\n"
    images = [noise_image(90 + 10 * i, 70, seed=i * 2 + j) for j in range(n)]
    return {"prompt": text, "multi_modal_data": {"image": images}}


def prompts() -> list:
    return [*(image_prompt(i) for i in range(4)), "just text, please", "more text"]


def assert_reference_tokens_with_images_on_ep0(outputs: list, expected: list[list[int]]) -> None:
    for i, out in enumerate(outputs):
        assert out.error is None, (i, out.error)
        assert out.outputs[0].token_ids == expected[i], i
    for out in outputs[:4]:  # the requests with images
        [prefilled] = [e for e in out.metrics.events if e.event is Event.PREFILL_START]
        assert prefilled.instance == "EP0", prefilled


def test_without_encoders_images_are_encoded_where_the_vision_tower_is(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    requests = prompts()
    with LLM(model) as reference:
        expected = [o.outputs[0].token_ids for o in reference.generate(requests, PARAMS, use_tqdm=False)]
    with LLM(model, layout="1E+1P+1EP+1D", instance_restarts=0) as llm:
        cluster = llm.engine
        os.kill(cluster.router.instances["E0"].ready.pid, signal.SIGKILL)
        deadline = time.monotonic() + WAIT_S
        while cluster.router.instances["E0"].alive:
            assert time.monotonic() < deadline, "the router never noticed E0's death"
            cluster.step()
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
    assert_reference_tokens_with_images_on_ep0(outputs, expected)


def test_a_layout_whose_only_encoder_also_prefills_serves_images_there(checkpoints):
    """1EP+1PD: no encoder-only instance at all. Requests with images are prefilled on EP0, which
    encodes them; text-only ones may go to PD0 too."""
    model = str(checkpoints["qwen2_5_vl"])
    requests = prompts()
    with LLM(model) as reference:
        expected = [o.outputs[0].token_ids for o in reference.generate(requests, PARAMS, use_tqdm=False)]
    with LLM(model, layout="1EP+1PD") as llm:
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
    assert_reference_tokens_with_images_on_ep0(outputs, expected)
