"""The offline API's behaviour: sampling knobs, stops, chat, logprobs, metrics, bad input."""

from __future__ import annotations

import base64
import io
import json
import shutil

import pytest

from epd import LLM, SamplingParams
from epd.inputs.errors import InvalidInputError
from epd.testing.images import noise_image

PROMPTS = ["<|im_start|>user\nTell me about the sea.<|im_end|>\n<|im_start|>assistant\n", "Once upon a time"]


@pytest.fixture(scope="module")
def llm(checkpoints):
    with LLM(str(checkpoints["qwen2_5_vl"])) as engine:
        yield engine


def greedy(llm, prompt, n=16, **kw):
    params = SamplingParams(temperature=0, max_tokens=n, ignore_eos=True, **kw)
    return llm.generate([prompt], params, use_tqdm=False)[0].outputs[0]


def test_seeded_sampling_is_reproducible_and_batch_independent(llm):
    params = SamplingParams(temperature=1.0, top_p=0.9, seed=1234, max_tokens=16, ignore_eos=True)
    alone = llm.generate([PROMPTS[0]], params, use_tqdm=False)[0].outputs[0].token_ids
    others = SamplingParams(temperature=1.0, max_tokens=16, ignore_eos=True)
    batched = llm.generate(PROMPTS + [PROMPTS[0]], [others, others, params], use_tqdm=False)
    assert batched[2].outputs[0].token_ids == alone
    other_seed = SamplingParams(temperature=1.0, top_p=0.9, seed=99, max_tokens=16, ignore_eos=True)
    assert llm.generate([PROMPTS[0]], other_seed, use_tqdm=False)[0].outputs[0].token_ids != alone


def test_stop_string_truncates_text(llm):
    full = greedy(llm, PROMPTS[1], n=24)
    stop = full.text[5:8]
    assert len(stop) == 3 and full.text.find(stop) == 5
    out = greedy(llm, PROMPTS[1], n=24, stop=[stop])
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == full.text[:5]
    kept = greedy(llm, PROMPTS[1], n=24, stop=[stop], include_stop_str_in_output=True)
    assert kept.text == full.text[:8]
    assert out.token_ids == full.token_ids[: len(out.token_ids)]


def test_stop_token_ids_and_max_tokens(llm):
    full = greedy(llm, PROMPTS[1], n=12)
    assert full.finish_reason == "length" and len(full.token_ids) == 12
    target = full.token_ids[4]
    first = full.token_ids.index(target)
    out = greedy(llm, PROMPTS[1], n=12, stop_token_ids=[target])
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == target


def test_eos_from_generation_config_stops_unless_ignored(llm, checkpoints, tmp_path):
    full = greedy(llm, PROMPTS[1], n=12)
    eos = full.token_ids[5]
    first = full.token_ids.index(eos)
    model = tmp_path / "model"
    shutil.copytree(checkpoints["qwen2_5_vl"], model)
    (model / "generation_config.json").write_text(json.dumps({"eos_token_id": [eos]}))
    with LLM(str(model)) as custom:
        params = SamplingParams(temperature=0, max_tokens=12)
        out = custom.generate([PROMPTS[1]], params, use_tqdm=False)[0].outputs[0]
        assert out.token_ids == full.token_ids[: first + 1]
        assert out.finish_reason == "stop" and out.stop_reason is None
        ignoring = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
        assert (
            custom.generate([PROMPTS[1]], ignoring, use_tqdm=False)[0].outputs[0].token_ids == full.token_ids
        )


def test_logprobs_shape_and_values(llm):
    out = greedy(llm, PROMPTS[0], n=6, logprobs=4)
    assert len(out.logprobs) == 6
    for token, position in zip(out.token_ids, out.logprobs):
        assert token in position and position[token].rank == 1  # greedy picks the top token
        assert 4 <= len(position) <= 5
        assert all(lp.logprob <= 0 and lp.decoded_token is not None for lp in position.values())
    assert greedy(llm, PROMPTS[0], n=3).logprobs is None


def _data_url(image) -> str:
    buf = io.BytesIO()
    image.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def test_chat_with_data_url_equals_generate_with_pil(llm):
    image = noise_image(180, 120, seed=11)
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": _data_url(image)}},
                {"type": "text", "text": "What is this?"},
            ],
        }
    ]
    params = SamplingParams(temperature=0, max_tokens=10)
    [chat] = llm.chat(messages, params, use_tqdm=False)
    prompt = (
        "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|>What is this?<|im_end|>\n<|im_start|>assistant\n"
    )
    [gen] = llm.generate([{"prompt": prompt, "multi_modal_data": {"image": image}}], params, use_tqdm=False)
    assert chat.prompt_token_ids == gen.prompt_token_ids
    assert chat.outputs[0].token_ids == gen.outputs[0].token_ids
    # A list of conversations gives one output per conversation.
    outs = llm.chat([messages, [{"role": "user", "content": "hi"}]], params, use_tqdm=False)
    assert len(outs) == 2 and outs[0].outputs[0].token_ids == chat.outputs[0].token_ids


def test_metrics_are_ordered(llm):
    out = llm.generate([PROMPTS[0]], SamplingParams(max_tokens=4), use_tqdm=False)[0]
    m = out.metrics
    assert m.arrival_time <= m.first_scheduled_time <= m.first_token_time <= m.finished_time


def test_bad_input_is_rejected_and_engine_keeps_serving(llm):
    bad_image = {
        "prompt": "<|vision_start|><|image_pad|><|vision_end|>x",
        "multi_modal_data": {"image": b"nope"},
    }
    with pytest.raises(InvalidInputError):
        llm.generate([PROMPTS[0], bad_image], use_tqdm=False)
    with pytest.raises(InvalidInputError):
        llm.generate([{"prompt": "no placeholder", "multi_modal_data": {"image": noise_image(64, 64, 1)}}])
    with pytest.raises(ValueError, match="temperature"):
        SamplingParams(temperature=-1)
    assert not llm.engine.has_unfinished_requests()
    assert greedy(llm, PROMPTS[0], n=3).finish_reason == "length"


def test_shutdown(checkpoints):
    llm = LLM(str(checkpoints["qwen2_vl"]), device="cpu")
    llm.shutdown()
    with pytest.raises(RuntimeError, match="shut down"):
        llm.generate(["hi"], use_tqdm=False)
