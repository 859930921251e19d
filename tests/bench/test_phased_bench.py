"""`epd bench --phases`: phases back to back on one timeline, each its own mix, reported per phase
(against the tiny 1EPD server of tests/bench); and what the phase parser refuses."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from epd.bench.serve.phases import load_phases, phase_offsets
from epd.bench.serve.spec import ArrivalSpec, PhaseSpec, SizeBucket, WorkloadSpec
from epd.cli import main

# The paper's two-phase shape, scaled down: the same image size, short answers then long ones.
PHASES = """
phases:
  - {name: short, image_size: 64x48, output_tokens: 4, rate: 40, num_requests: 5}
  - {name: long, output_tokens: 24, rate: 20, duration: 0.4, max_concurrency: 2}
"""
FLAGS = ["--image-size", "64x48", "--prompt-tokens", "16", "--warmup", "1", "--no-progress"]
FLAGS += ["--slo-ttft", "60", "--slo-tpot", "10"]


def test_two_phases_run_end_to_end_and_are_reported_per_phase(server, tmp_path: Path, capsys):
    spec = tmp_path / "phases.yaml"
    spec.write_text(PHASES)
    out = tmp_path / "out"
    args = ["bench", "--base-url", server.url, "--out", str(out), "--phases", str(spec), *FLAGS]
    assert main(args) == 0
    doc = json.loads((out / "results.json").read_text())

    short, long = doc["runs"]
    assert short["label"] == "short (40 req/s)" and long["label"] == "long (20 req/s)"
    assert short["phase"]["start_s"] == 0 and short["phase"]["num_requests"] == 5
    last_short = max(r["scheduled_s"] for r in short["requests"])
    assert long["phase"]["start_s"] == pytest.approx(last_short + 1 / 40), "one mean gap after it"
    assert long["phase"]["duration_s"] == 0.4 and long["phase"]["num_requests"] >= 1
    for run, tokens in ((short, 4), (long, 24)):
        assert run["summary"]["failed"] == 0
        assert {r["output_tokens"] for r in run["requests"]} == {tokens}
        assert run["phase"]["workload"]["output_tokens"] == tokens
    starts = [r["scheduled_s"] for r in long["requests"]]
    assert min(starts) >= long["phase"]["start_s"] and max(starts) < long["phase"]["start_s"] + 0.4
    total = short["phase"]["num_requests"] + long["phase"]["num_requests"]
    assert doc["overall"]["completed"] == total and doc["sweep"]["goodput_rate"] is None
    assert len({r["index"] for run in doc["runs"] for r in run["requests"]}) == total
    printed = capsys.readouterr().out
    assert "short (40 req/s)" in printed and "all phases" in printed


BASE = WorkloadSpec(output_tokens=128)
ARRIVAL = ArrivalSpec(rate=2.0)


def test_keys_left_out_come_from_the_flags():
    short, long = load_phases(
        '[{"output_tokens": 16, "image_size": "1344x1344"}, {"name": "long", "duration": 5, "rate": 0.5}]',
        BASE,
        ARRIVAL,
        num_requests=7,
    )
    assert short == PhaseSpec(
        "phase0", WorkloadSpec(output_tokens=16, image_sizes=(SizeBucket(1344, 1344),)), ARRIVAL, 7
    )
    assert long.workload == BASE and long.arrival.rate == 0.5 and long.duration_s == 5
    assert long.num_requests is None


def test_a_duration_phase_draws_arrivals_until_it_ends_the_same_way_each_time():
    [phase] = load_phases('[{"rate": 50, "duration": 2}]', BASE, ARRIVAL, 1)
    offsets, length = phase_offsets(phase, seed=3)
    assert length == 2 and offsets[0] == 0 and max(offsets) < 2 and 60 < len(offsets) < 140
    assert phase_offsets(phase, seed=3) == (offsets, length)
    [counted] = load_phases('[{"rate": 4, "num_requests": 3}]', BASE, ARRIVAL, 1)
    offsets, length = phase_offsets(counted, seed=3)
    assert len(offsets) == 3 and length == pytest.approx(offsets[-1] + 0.25)


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("[]", "non-empty list"),
        ('{"phases": 3}', "non-empty list"),
        ("[{", "not valid JSON"),
        ("no-such-file.yaml", "no file"),
        ('[{"outputs": 3}]', "unknown key(s) outputs"),
        ('[{"num_requests": 3, "duration": 2}]', "not both"),
        ('[{"duration": 2, "rate": "inf"}]', "needs a finite rate"),
        ('[{"rate": 0}]', "not > 0"),
        ('[{"output_tokens": 1.5}]', "not a positive integer"),
        ('[{"image_size": "big"}]', "not WxH"),
        ('[{"arrival": "uniform"}]', "not one of poisson, gamma"),
    ],
)
def test_bad_phases_are_clear_errors(text, says):
    with pytest.raises(ValueError, match=r"--phases") as err:
        load_phases(text, BASE, ArrivalSpec(rate=math.inf), 4)
    assert says in str(err.value)


def test_phases_with_a_rate_sweep_is_a_usage_error(tmp_path: Path, capsys):
    with pytest.raises(SystemExit):
        main(["bench", "--phases", "[{}]", "--rates", "1,2", "--out", str(tmp_path)])
    assert "--phases runs its phases' own rates" in capsys.readouterr().err
