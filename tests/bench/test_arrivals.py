"""Arrival processes: mean rate and coefficient of variation of seeded samples, determinism."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from epd.bench.serve.arrivals import arrival_offsets, gaps
from epd.bench.serve.spec import ArrivalSpec

N = 200_000  # samples: the mean and CV estimates are then within about 1%


@pytest.mark.parametrize(
    "process, rate, cv",
    [("poisson", 4.0, 1.0), ("gamma", 4.0, 1.0), ("gamma", 2.0, 3.0), ("gamma", 10.0, 0.25)],
)
def test_mean_rate_and_cv(process: str, rate: float, cv: float):
    g = gaps(N, rate, process, cv, np.random.default_rng(7))
    assert 1 / g.mean() == pytest.approx(rate, rel=0.02)
    assert g.std() / g.mean() == pytest.approx(cv, rel=0.03)
    assert (g >= 0).all()


def test_offsets_start_at_zero_and_are_deterministic():
    spec = ArrivalSpec(rate=5.0, process="gamma", burstiness=2.0)
    a, b = arrival_offsets(50, spec, seed=3), arrival_offsets(50, spec, seed=3)
    assert a == b and a[0] == 0.0 and len(a) == 50
    assert all(x <= y for x, y in zip(a, a[1:]))
    assert arrival_offsets(50, spec, seed=4) != a
    # Same seed, same shape of gaps at another rate: scaled, so runs of a sweep compare alike.
    half = arrival_offsets(50, ArrivalSpec(rate=10.0, process="gamma", burstiness=2.0), seed=3)
    assert half == pytest.approx([x / 2 for x in a])


def test_infinite_rate_sends_everything_at_once():
    assert arrival_offsets(5, ArrivalSpec(rate=math.inf), seed=0) == [0.0] * 5
    assert arrival_offsets(0, ArrivalSpec(rate=1.0), seed=0) == []


def test_bad_parameters():
    rng = np.random.default_rng(0)
    with pytest.raises(ValueError, match="rate"):
        gaps(3, 0.0, "poisson", 1.0, rng)
    with pytest.raises(ValueError, match="burstiness"):
        gaps(3, 1.0, "gamma", 0.0, rng)
    with pytest.raises(ValueError, match="unknown"):
        gaps(3, 1.0, "uniform", 1.0, rng)


def test_one_pattern_scaled_exactly_to_each_rate():
    runs = [ArrivalSpec(rate, "gamma", 3.0, pattern_seed=5) for rate in (2.0, 4.0)]
    a, b = (np.diff(arrival_offsets(200, spec, seed=run)) for run, spec in enumerate(runs))
    assert a.sum() == pytest.approx(199 / 2.0) and b.sum() == pytest.approx(199 / 4.0)  # exact rates
    assert b == pytest.approx(a / 2)  # the same bursts, whatever each run's own seed
    drawn = np.diff(arrival_offsets(200, ArrivalSpec(4.0, "gamma", 3.0), seed=5))
    assert abs(drawn.sum() - 199 / 4.0) > 1.0  # one draw of 200 CV-3 gaps: seconds off the rate
    assert b == pytest.approx(drawn * (b.sum() / drawn.sum()))  # that draw, scaled to it
    assert arrival_offsets(1, runs[0], seed=0) == [0.0]
    assert arrival_offsets(3, ArrivalSpec(math.inf, pattern_seed=5), seed=0) == [0.0] * 3


def test_same_arrivals_flag_reaches_every_run_of_a_sweep(tmp_path):
    from epd.cli import main

    args = ["simulate", "--layout", "1EPD", "--rates", "2,4", "--num-requests", "9", "--arrival", "gamma"]
    args += ["--burstiness", "3", "--same-arrivals", "--seed", "7", "--image-size", "64x48"]
    assert main([*args, "--output-tokens", "2", "--out", str(tmp_path)]) == 0
    runs = json.loads((tmp_path / "results.json").read_text())["runs"]
    sent = [sorted(r["scheduled_s"] for r in run["requests"]) for run in runs]
    assert [run["arrival"]["pattern_seed"] for run in runs] == [7, 7]
    assert sent[0][-1] == pytest.approx(8 / 2.0) and sent[1] == pytest.approx([t / 2 for t in sent[0]])
