"""The training script runs end to end (tiny model, a few steps) and writes a loadable checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from epd import LLM, SamplingParams
from epd.demo.data import IGNORE, Mixture, TrainBatches, encode_sample
from epd.demo.shapes import chat_messages, make_sample, multi_image_sample
from epd.demo.train import lr_factor, main
from epd.inputs.processor import InputProcessor

EXPECTED_FILES = {
    "config.json",
    "model.safetensors",
    "generation_config.json",
    "preprocessor_config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "train_report.json",
}


@pytest.fixture(scope="module")
def quick(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("quick")
    return out, main(["--out", str(out), "--quick"])


def test_quick_run_writes_a_directory_epd_and_transformers_load(quick):
    from transformers import AutoModelForImageTextToText

    tmp_path, report = quick
    assert EXPECTED_FILES <= {p.name for p in tmp_path.iterdir()}
    assert report["args"]["steps"] == 3 and 0 <= report["accuracy"]["single"] <= 1
    assert json.loads((tmp_path / "train_report.json").read_text())["parameters"] == report["parameters"]
    generation = json.loads((tmp_path / "generation_config.json").read_text())
    processor = InputProcessor.from_pretrained(tmp_path)
    tok = processor.tokenizer
    assert generation["eos_token_id"] == [tok.token_to_id("<|im_end|>"), tok.token_to_id("<|endoftext|>")]

    hf = AutoModelForImageTextToText.from_pretrained(tmp_path)
    assert hf.config.model_type == "qwen2_5_vl"
    with LLM(str(tmp_path), max_model_len=512) as llm:
        [out] = llm.chat(chat_messages(multi_image_sample(0)), SamplingParams(temperature=0, max_tokens=4))
        assert len(out.outputs[0].token_ids) >= 1


def test_labels_cover_exactly_the_answer_and_end_of_turn(quick):
    tmp_path, _ = quick
    processor = InputProcessor.from_pretrained(tmp_path)
    sample = make_sample("labels", None)
    encoded = encode_sample(processor, sample)
    prompt = processor.process_chat(chat_messages(sample))
    n = len(prompt.prompt_token_ids)
    assert encoded.input_ids[:n] == prompt.prompt_token_ids
    assert set(encoded.labels[:n]) == {IGNORE}
    target = encoded.labels[n:]
    assert processor.tokenizer.decode(target, skip_special_tokens=False) == sample.answer + "<|im_end|>"
    assert encoded.positions.shape == (3, len(encoded.input_ids))


def test_batches_are_a_function_of_seed_and_step(quick):
    tmp_path, _ = quick
    data = TrainBatches(tmp_path, seed=1, batch_size=3, steps=4, mixture=Mixture(0.5, single_only_steps=2))
    first, again = data[3], TrainBatches(tmp_path, 1, 3, 4, Mixture(0.5, 2))[3]
    for key in first:
        assert torch.equal(first[key], again[key])
    # Single-image only during the first steps: one image per sample.
    assert len(data[0]["image_grid_thw"]) == 3
    pad = InputProcessor.from_pretrained(tmp_path).tokenizer.pad_token_id
    assert first["attention_mask"].sum() == (first["input_ids"] != pad).sum()


def test_learning_rate_schedule():
    assert lr_factor(0, 10, 100) == 0.1
    assert lr_factor(9, 10, 100) == 1.0
    assert abs(lr_factor(100, 10, 100) - 0.05) < 1e-9
    assert lr_factor(50, 10, 100) < lr_factor(20, 10, 100)
