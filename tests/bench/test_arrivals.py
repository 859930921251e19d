"""Arrival processes: mean rate and coefficient of variation of seeded samples, determinism."""

from __future__ import annotations

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
