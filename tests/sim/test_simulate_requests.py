"""The simulator serves the requests `epd bench` sends: same draws, and the prompts the server makes
of them (token ids, image grids, placeholders) without a pixel; the same send times."""

from __future__ import annotations

import base64
import io

import pytest
from PIL import Image

from epd.bench.serve.arrivals import arrival_offsets
from epd.bench.serve.spec import ArrivalSpec, BenchSpec, SizeBucket, WorkloadSpec
from epd.bench.serve.workload import build_requests, derive_seed
from epd.cli import default_model
from epd.inputs.processor import InputProcessor
from epd.sim.bench_requests import bench_run
from epd.sim.images import SizedImageProcessor, image_size, standin_url

SIZES = (SizeBucket(300, 200), SizeBucket(64, 900, 0.5), SizeBucket(1344, 1344))


@pytest.fixture(scope="module")
def model() -> str:
    return default_model()


def image_urls(messages: list[dict]) -> list[str]:
    return [p["image_url"]["url"] for p in messages[0]["content"] if p["type"] == "image_url"]


def spec_of(workload: WorkloadSpec, n: int, seed: int, rates: tuple[float, ...] = (5.0,)) -> BenchSpec:
    return BenchSpec(
        "sim", workload=workload, arrivals=tuple(ArrivalSpec(r) for r in rates), num_requests=n, seed=seed
    )


@pytest.mark.parametrize("run", [0, 1])
def test_the_prompts_the_server_would_make(model: str, run: int):
    workload = WorkloadSpec(
        images_per_request=(0, 3), image_sizes=SIZES, image_reuse=0.4, prompt_tokens=40, output_tokens=16
    )
    spec = spec_of(workload, 30, 3, rates=(5.0, 10.0))
    sent = build_requests(workload, 30, 3, f"run{run}", model)  # what `epd bench` sends, JPEGs and all
    simulated = bench_run(spec, run, SizedImageProcessor.from_pretrained(model), 2048, model)
    server = InputProcessor.from_pretrained(model)
    for i, request in enumerate(sent):
        real, sim = server.process_chat(request.messages), simulated.requests[i].prompt
        assert sim.prompt_token_ids == real.prompt_token_ids
        assert sim.placeholders == real.placeholders
        assert [img.grid_thw for img in sim.images] == [img.grid_thw for img in real.images]
        assert simulated.requests[i].params.max_tokens == request.max_tokens == 16
        assert simulated.requests[i].params.ignore_eos and simulated.requests[i].params.temperature == 0
    urls = [u for r in sent for u in image_urls(r.messages)]
    hashes = [img.content_hash for r in simulated.requests.values() for img in r.prompt.images]
    assert first_seen(hashes) == first_seen(urls)  # the same images repeat: the caches hit alike
    assert len(set(urls)) < len(urls)
    seed = derive_seed(3, "arrivals", run)
    assert simulated.offsets == arrival_offsets(30, spec.arrivals[run], seed)
    assert [r.arrival_time for r in simulated.requests.values()] == simulated.offsets


def first_seen(keys: list[str]) -> list[int]:
    """Where each key was first seen: the reuse pattern of a list of images."""
    return [keys.index(k) for k in keys]


def test_sizes_and_reuse_follow_the_drawn_images(model: str):
    workload = WorkloadSpec(images_per_request=(2, 4), image_sizes=SIZES, image_reuse=0.5, output_tokens=4)
    sent = build_requests(workload, 50, 11, "run0", model)
    named = build_requests(workload, 50, 11, "run0", model, standin_url)
    for real, standin in zip(sent, named):
        sizes = [decoded(u).size for u in image_urls(real.messages)]
        assert sizes == [image_size(u) for u in image_urls(standin.messages)]
        assert real.messages[0]["content"][-1] == standin.messages[0]["content"][-1]  # the same text
        assert (real.max_tokens, real.extra, real.num_images) == (
            standin.max_tokens,
            standin.extra,
            standin.num_images,
        )
    real_urls = [u for r in sent for u in image_urls(r.messages)]
    assert first_seen(real_urls) == first_seen([u for r in named for u in image_urls(r.messages)])


def decoded(url: str) -> Image.Image:
    return Image.open(io.BytesIO(base64.b64decode(url.split(",", 1)[1])))


def test_requests_the_server_would_refuse_fail_as_in_bench(simulate, quick):
    doc = simulate("--layout", "1EPD", *quick, "--output-tokens", "4000")  # past the 2048 context
    summary = doc["runs"][0]["summary"]
    assert summary["completed"] == 0 and summary["failed"] == 40
    assert doc["runs"][0]["requests"][0]["error"].startswith("HTTP 400")


def test_max_concurrency_holds_requests_back(simulate, quick):
    doc = simulate("--layout", "1E+1P+1D", "--max-concurrency", "2", *quick)
    requests = doc["runs"][0]["requests"]
    spans = [(r["sent_s"], r["sent_s"] + r["e2e"]) for r in requests]
    for start, _ in spans:
        assert sum(s <= start < e for s, e in spans) <= 2
    assert max(r["sent_s"] - r["scheduled_s"] for r in requests) > 0  # rate inf: all scheduled at 0


def test_images_from_data_urls_are_sized_from_their_header():
    buffer = io.BytesIO()
    Image.new("RGB", (123, 45)).save(buffer, "PNG")
    url = "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()
    assert image_size(url) == (123, 45)
    assert image_size(standin_url(1344, 896, 5)) == (1344, 896)
