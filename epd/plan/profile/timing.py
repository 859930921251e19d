"""Timing many shapes fairly: warm every one up, then time them in rounds, keep each one's median.

Why rounds: a device's speed drifts over seconds (clocks ramp up and down, a busy host steals
time, caches and allocators settle). Timed shape after shape, such a spell lands on a few shapes
and bends the fit; timed round after round, each shape gets one sample per spell and its median
throws the spell away.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence

import torch

Timing = Callable[[], float]  # runs once, returns the seconds it took


def medians_in_rounds(timings: Sequence[Timing], warmup: int, repeats: int) -> list[float]:
    """Each timing run `warmup` times untimed, then `repeats` rounds of one run each: the medians."""
    for timing in timings:
        for _ in range(warmup):
            timing()
    samples: list[list[float]] = [[] for _ in timings]
    for _ in range(repeats):
        for sample, timing in zip(samples, timings):
            sample.append(timing())
    return [statistics.median(sample) for sample in samples]


def synchronized(fn: Callable[[], object], device: torch.device) -> Timing:
    """`fn` timed by the host clock, the device synchronised before and after (on CUDA), so that
    the time covers the host's work and the device's, as a waiting instance sees them."""
    cuda = device.type == "cuda"

    def timing() -> float:
        if cuda:
            torch.cuda.synchronize(device)
        started = time.perf_counter()
        fn()
        if cuda:
            torch.cuda.synchronize(device)
        return time.perf_counter() - started

    return timing
