"""When each request is sent: offsets in seconds from the start of a run.

Gaps between requests are independent draws with mean 1/rate:
- Poisson: exponential gaps (coefficient of variation 1);
- gamma: shape k = 1/CV^2 and scale 1/(rate k), so the mean stays 1/rate and the CV is
  `burstiness` (CV > 1: bursts and lulls; CV < 1: more regular than Poisson; CV = 1: Poisson).
  Note that `vllm bench serve --burstiness` is the gamma *shape* k, i.e. 1/CV^2.
The first request goes at 0; an infinite rate sends every request at 0.
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
    """Send times of `n` requests, the first at 0. Same seed, same times."""
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    between = gaps(n - 1, spec.rate, spec.process, spec.burstiness, rng)
    return [0.0, *np.cumsum(between).tolist()]
