"""Workloads: deterministic, with the asked-for images, reuse, text length; flag-value parsers."""

from __future__ import annotations

import argparse
import base64
import io
import json
import random
from pathlib import Path

import pytest
from PIL import Image

from epd.bench.serve.client import prepare
from epd.bench.serve.spec import SizeBucket, WorkloadSpec, parse_int_range, parse_rates, parse_sizes
from epd.bench.serve.text import PromptText
from epd.bench.serve.workload import build_requests
from epd.demo.shapes import MULTI_QUESTION, SINGLE_QUESTION
from epd.testing.images import noise_image

SMALL = (SizeBucket(32, 24), SizeBucket(48, 40, 3.0))


def image_urls(req) -> list[str]:
    return [p["image_url"]["url"] for p in req.messages[0]["content"] if p["type"] == "image_url"]


def decode(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_parsers():
    assert parse_int_range("3") == (3, 3) and parse_int_range("1-4") == (1, 4)
    assert parse_sizes("1344x1344") == (SizeBucket(1344, 1344),)
    assert parse_sizes("448x448:0.7, 1344X896:0.3") == (SizeBucket(448, 448, 0.7), SizeBucket(1344, 896, 0.3))
    assert parse_rates("0.5,1,inf") == (0.5, 1.0, float("inf"))
    for parse, bad in [
        (parse_int_range, "4-1"),
        (parse_sizes, "12"),
        (parse_sizes, "0x5"),
        (parse_rates, "1,0"),
    ]:
        with pytest.raises(argparse.ArgumentTypeError):
            parse(bad)


def test_synthetic_is_deterministic_and_follows_the_spec():
    spec = WorkloadSpec(images_per_request=(1, 3), image_sizes=SMALL, image_reuse=0.5, output_tokens=7)
    a = build_requests(spec, 60, seed=1, namespace="run0", tokenizer_dir=None)
    assert prepare(a, "m", True) == prepare(build_requests(spec, 60, 1, "run0", None), "m", True)
    assert prepare(a, "m", True) != prepare(build_requests(spec, 60, 1, "run1", None), "m", True)
    urls = [u for r in a for u in image_urls(r)]
    assert all(1 <= r.num_images == len(image_urls(r)) <= 3 for r in a)
    assert 0.35 < 1 - len(set(urls)) / len(urls) < 0.65  # share of repeated images, about 0.5
    sizes = {decode(u).size for u in set(urls)}
    assert sizes == {(32, 24), (48, 40)}
    pixels = decode(urls[0]).convert("RGB").getcolors(maxcolors=10_000)
    assert pixels is None or len(pixels) > 100  # real pixel variety, not a solid colour
    assert all(r.max_tokens == 7 and r.extra == {"temperature": 0.0, "ignore_eos": True} for r in a)


def test_text_only_share():
    spec = WorkloadSpec(image_sizes=SMALL, text_only_share=0.3)
    reqs = build_requests(spec, 200, seed=0, namespace="run0", tokenizer_dir=None)
    assert 0.2 < sum(r.num_images == 0 for r in reqs) / len(reqs) < 0.4


def test_prompt_tokens_are_exact_with_the_model_tokenizer(model: str):
    reqs = build_requests(WorkloadSpec(prompt_tokens=50, image_sizes=SMALL), 10, 0, "run0", model)
    assert [r.prompt_text_tokens for r in reqs] == [50] * 10
    text = PromptText(model)
    for n in (1, 7, 300):
        words, count = text.make(n, random.Random(n))
        assert count == n and len(text.tokenizer.encode(words, add_special_tokens=False).ids) == n
    assert PromptText(None).make(12, random.Random(0))[1] is None  # words, uncounted


def test_shapes_requests_carry_the_task_and_its_answer():
    reqs = build_requests(
        WorkloadSpec(kind="shapes", images_per_request=(1, 3), output_tokens=64), 20, 0, "r", None
    )
    for r in reqs:
        question = r.messages[0]["content"][-1]["text"]
        assert question == (SINGLE_QUESTION if r.num_images == 1 else MULTI_QUESTION)
        assert r.expected and r.max_tokens == 64 and "ignore_eos" not in r.extra
        assert all(u.startswith("data:image/png;base64,") for u in image_urls(r))
    with pytest.raises(ValueError, match="1 to 4"):
        build_requests(WorkloadSpec(kind="shapes", images_per_request=(2, 5)), 1, 0, "r", None)


def test_jsonl_lines_local_images_and_overrides(tmp_path: Path):
    noise_image(40, 30, seed=2).save(tmp_path / "pic.png")
    lines = [
        {"messages": [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": "pic.png"}}, {"type": "text", "text": "hi"}]}],
         "max_tokens": 5, "top_k": 3, "stream": False, "expected": "red circle"},
        {"custom_id": "x", "body": {"messages": [{"role": "user", "content": "text only"}], "max_tokens": 9}},
    ]  # fmt: skip
    path = tmp_path / "data.jsonl"
    path.write_text("\n".join(map(json.dumps, lines)) + "\n\n")
    reqs = build_requests(
        WorkloadSpec(kind="jsonl", dataset_path=str(path), output_tokens=None), 3, 0, "r", None
    )
    assert [r.num_images for r in reqs] == [1, 0, 1]  # cycled
    assert [r.max_tokens for r in reqs] == [5, 9, 5]
    assert reqs[0].extra == {"top_k": 3} and reqs[0].expected == "red circle" and reqs[1].expected is None
    assert decode(image_urls(reqs[0])[0]).size == (40, 30)
    body = json.loads(prepare(reqs, "served", False)[0].payload)
    assert body["stream"] is True and body["model"] == "served" and "expected" not in body
    over = build_requests(
        WorkloadSpec(kind="jsonl", dataset_path=str(path), output_tokens=2), 2, 0, "r", None
    )
    assert [r.max_tokens for r in over] == [2, 2]
