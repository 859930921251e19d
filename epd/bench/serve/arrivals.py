"""When each request is sent: offsets in seconds from the start of a run.

Gaps between requests are independent draws with mean 1/rate:
- Poisson: exponential gaps (coefficient of variation 1);
- gamma: shape k = 1/CV^2 and scale 1/(rate k), so the mean stays 1/rate and the CV is
  `burstiness` (CV > 1: bursts and lulls; CV < 1: more regular than Poisson; CV = 1: Poisson).
  Note that `vllm bench serve --burstiness` is the gamma *shape* k, i.e. 1/CV^2.
The first request goes at 0; an infinite rate sends every request at 0.

Each run of a sweep draws its own gaps (its own seed). A short run of bursty arrivals then
offers a rate off its nominal one by about CV/sqrt(n) (21% for CV 3 and 200 requests) and bursts
of its own, which blur a rate sweep. With `pattern_seed` (--same-arrivals) every run sends one
pattern instead, drawn from that seed and scaled so that its gaps average exactly 1/rate: runs
that differ only in rate, as `epd plan` compares them.
"""

from __future__ import annotations

import math

import numpy as np

from epd.bench.serve.spec import ArrivalSpec


def gaps(n: int, rate: float, process: str, burstiness: float, rng: np.random.Generator) -> np.ndarray:
    """`n` gaps between consecutive arrivals (seconds)."""
    if math.isinf(rate):
        return np.zeros(n)
    if rate <= 0:
        raise ValueError(f"rate must be > 0, got {rate}")
    if process == "poisson":
        return rng.exponential(1.0 / rate, n)
    if process == "gamma":
        if burstiness <= 0:
            raise ValueError(f"burstiness (CV) must be > 0, got {burstiness}")
        shape = 1.0 / burstiness**2
        return rng.gamma(shape, 1.0 / (rate * shape), n)
    raise ValueError(f"unknown arrival process {process!r} (poisson or gamma)")


def arrival_offsets(n: int, spec: ArrivalSpec, seed: int) -> list[float]:
    """Send times of `n` requests, the first at 0. Same seed (or pattern seed), same times."""
    if n <= 0:
        return []
    pattern = spec.pattern_seed is not None
    rng = np.random.default_rng(spec.pattern_seed if pattern else seed)
    between = gaps(n - 1, spec.rate, spec.process, spec.burstiness, rng)
    if pattern and math.isfinite(spec.rate) and between.sum() > 0:
        between *= (n - 1) / spec.rate / between.sum()
    return [0.0, *np.cumsum(between).tolist()]
