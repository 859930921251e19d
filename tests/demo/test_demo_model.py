"""The shipped demo checkpoint: accurate through epd, and epd's answers are transformers' answers.

Requests are fresh samples from the "test/..." seeds, which neither training ("train/...")
nor the training script's report ("eval/...") uses.
"""

from __future__ import annotations

import json

import pytest
import torch

from epd import LLM, SamplingParams
from epd.demo import DEMO_MODEL_DIR, SAMPLES_DIR
from epd.demo.evaluate import MAX_NEW_TOKENS
from epd.demo.shapes import chat_messages, is_correct, make_sample
from epd.testing.reference import hf_greedy, load_hf_model

NUM_SINGLE, NUM_MULTI, NUM_COMPARED = 200, 100, 20
GREEDY = SamplingParams(temperature=0, max_tokens=MAX_NEW_TOKENS)


@pytest.fixture(scope="module", params=["1EPD", "1E+1P+1D"])
def llm(request):
    # 4 images of 64 tokens + the template + the longest answer fit in 512 positions; a large
    # token budget per step prefills many requests at once, which is what keeps this test quick.
    with LLM(
        str(DEMO_MODEL_DIR),
        layout=request.param,
        max_model_len=512,
        num_kv_blocks=4096,
        max_num_batched_tokens=4096,
    ) as llm:
        yield llm


def run(llm: LLM, samples: list) -> list:
    return llm.chat([chat_messages(s) for s in samples], GREEDY, use_tqdm=False)


@pytest.fixture(scope="module")
def single(llm):
    samples = [make_sample(f"test/single/{i}", 1) for i in range(NUM_SINGLE)]
    return samples, run(llm, samples)


@pytest.fixture(scope="module")
def multi(llm):
    samples = [make_sample(f"test/multi/{i}", None) for i in range(NUM_MULTI)]
    return samples, run(llm, samples)


def exact(samples: list, outputs: list) -> float:
    return sum(is_correct(o.outputs[0].text, s.answer) for s, o in zip(samples, outputs)) / len(samples)


def test_single_image_accuracy(single):
    assert exact(*single) >= 0.95


def test_multi_image_accuracy(multi):
    samples, _ = multi
    assert {len(s.images) for s in samples} == {2, 3, 4}
    assert exact(*multi) >= 0.90


def test_epd_answers_equal_transformers_greedy(llm, single, multi):
    hf = load_hf_model(DEMO_MODEL_DIR)
    half = NUM_COMPARED // 2
    pairs = list(zip(*[x[:half] for x in single])) + list(zip(*[x[:half] for x in multi]))
    for sample, out in pairs:
        prompt = llm.processor.process_chat(chat_messages(sample))
        assert out.prompt_token_ids == prompt.prompt_token_ids
        expected, _ = hf_greedy(
            hf,
            prompt.prompt_token_ids,
            MAX_NEW_TOKENS,
            pixel_values=torch.cat([img.pixel_values for img in prompt.images]),
            image_grid_thw=torch.tensor([img.grid_thw for img in prompt.images]),
        )
        assert out.outputs[0].token_ids == expected


def test_shipped_sample_images_and_their_answers(llm):
    answers = json.loads((SAMPLES_DIR / "answers.json").read_text())
    paths = [str(SAMPLES_DIR / item["file"]) for item in answers["images"]]
    conversations = [
        [
            {
                "role": "user",
                "content": [{"type": "image", "image": p}, {"type": "text", "text": item["question"]}],
            }
        ]
        for p, item in zip(paths, answers["images"])
    ]
    together = answers["all_images"]
    content = [{"type": "image_url", "image_url": {"url": f"file://{p}"}} for p in paths]
    conversations.append(
        [{"role": "user", "content": [*content, {"type": "text", "text": together["question"]}]}]
    )
    outputs = llm.chat(conversations, GREEDY, use_tqdm=False)
    expected = [item["answer"] for item in answers["images"]] + [together["answer"]]
    assert [o.outputs[0].text for o in outputs] == expected


def test_checkpoint_directory_is_complete_and_small():
    names = {p.name for p in DEMO_MODEL_DIR.iterdir()}
    assert {"config.json", "model.safetensors", "tokenizer.json", "preprocessor_config.json"} <= names
    assert {"generation_config.json", "tokenizer_config.json", "special_tokens_map.json"} <= names
    assert (DEMO_MODEL_DIR / "model.safetensors").stat().st_size < 16 * 2**20


def test_transformers_loads_the_checkpoint_as_saved():
    from transformers import AutoModelForImageTextToText

    model = AutoModelForImageTextToText.from_pretrained(DEMO_MODEL_DIR)
    assert type(model).__name__ == "Qwen2_5_VLForConditionalGeneration"
    assert model.dtype == torch.bfloat16  # stored in bf16; the tests above load it in fp32
