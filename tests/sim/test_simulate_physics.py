"""What a simulation must get right whatever its costs: more load waits longer, more encoders
encode sooner, and the stand-ins it runs on (narrow embeddings) change no figure."""

from __future__ import annotations

import dataclasses

from epd.cli import build_parser, simulated_engine_args
from epd.config import ModelConfig
from epd.sim.command import simulate_spec
from epd.sim.images import SizedImageProcessor
from epd.sim.simulation import simulate_rate

# Every forward costs 10 ms plus 0.1 ms per token: one instance serves a few requests per second.
SATURATING = "step_s=0.01,token_s=1e-4,sequence_s=1e-3,encode_s=0,patch_s=1e-5"
# An image of 224 px (256 patches) takes 0.256 s to encode; everything else is nearly free.
ENCODE_BOUND = "step_s=1e-4,token_s=1e-6,sequence_s=0,encode_s=0,patch_s=1e-3"


def ttft(run: dict, stat: str = "p50") -> float:
    return run["summary"]["ttft"][stat]


def test_a_higher_rate_waits_longer(simulate, quick):
    doc = simulate("--layout", "1EPD", "--rates", "2,20,200", "--costs", SATURATING, *quick)
    runs = doc["runs"]
    assert all(run["summary"]["completed"] == 40 for run in runs)
    assert ttft(runs[0]) < ttft(runs[1]) < ttft(runs[2])
    assert ttft(runs[0], "p90") < ttft(runs[1], "p90") < ttft(runs[2], "p90")
    throughput = [run["summary"]["request_throughput"] for run in runs]
    assert throughput[2] < 200 / 2  # saturated: far below the offered rate


def test_more_encoders_encode_a_many_image_workload_sooner(simulate, quick):
    flags = ["--rate", "1", "--images-per-request", "4", "--costs", ENCODE_BOUND, *quick]
    one = simulate("--layout", "1E+1P+1D", *flags, name="one")["runs"][0]
    three = simulate("--layout", "3E+1P+1D", *flags, name="three")["runs"][0]
    assert ttft(three) < 0.6 * ttft(one)
    assert one["stages"]["encode_queue"] > three["stages"]["encode_queue"]
    assert ttft(one) > 4 * 0.256  # four images one after another on the one encoder, at least


def test_narrow_embeddings_change_no_figure(quick):
    args = build_parser().parse_args(
        [
            "simulate",
            "--layout",
            "2E+1P+1D",
            "--rate",
            "8",
            "--image-reuse",
            "0.3",
            "--images-per-request",
            "1-3",
        ]
        + [*quick, "--mm-cache-bytes", "256KiB", "--transfer-bandwidth", "1e8", "--transfer-latency", "1e-4"]
    )
    narrow = simulate_spec(args, simulated_engine_args(args))
    model = narrow.cluster.engine.model
    assert model.hf.text.hidden_size < ModelConfig(model.model).hf.text.hidden_size
    real_bytes = args.mm_cache_bytes
    engine = dataclasses.replace(narrow.cluster.engine, model=ModelConfig(model.model, dtype=model.dtype))
    real = dataclasses.replace(
        narrow, cluster=dataclasses.replace(narrow.cluster, engine=engine, mm_cache_bytes=real_bytes)
    )
    processor = SizedImageProcessor.from_pretrained(model.model)
    narrow_run, narrow_figures = simulate_rate(narrow, 0, processor)
    real_run, real_figures = simulate_rate(real, 0, processor)
    assert narrow_run == real_run
    assert narrow_figures["log_digest"] != ""
    assert narrow_run["summary"]["completed"] == 40
