"""The goodput of one configuration: the highest rate it serves with >= 90% SLO attainment,
found with a few simulations, never above its capacity estimate.

    probe (optional): the rate to beat (the best goodput so far, or --rate); failing it ends the
        search at one simulation: this configuration cannot matter
    bracket: without a probe, from half the capacity estimate down by 4x until a rate passes
    bisect: `steps` geometric midpoints between the highest passing and the lowest failing rate
        (the capacity estimate stands for the failing one until a rate fails)

Why the cap: a run of N requests absorbs a burst. Above its capacity a layout falls behind by
(1/capacity - 1/rate) seconds per request, so the last of 100 requests at twice the capacity of
200 req/s waits only 0.25 s more: within most TTFT SLOs, though no real server sustains that rate.
Rates above the estimate are therefore not simulated, and a configuration that passes everything
below it is marked `at_capacity`: its runs were too short to show where it falls behind.

The goodput is `epd bench`'s over the simulated rates (epd.bench.serve.metrics.goodput_rate: the
highest passing rate, interpolated towards the next failing one), so a plan's number means what
`epd bench`'s does for as many requests.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

from epd.bench.serve.metrics import goodput_rate
from epd.plan.search.evaluate import Trial

LOWEST_FRACTION = 1 / 256  # of the capacity estimate: below it, a configuration serves nothing
CLOSE_ENOUGH = 1.02  # stop bisecting once the bracket is this narrow

RunAt = Callable[[float], "Trial | None"]  # a simulation at a rate; None: out of budget


@dataclass(frozen=True)
class RateSearch:
    trials: tuple[Trial, ...]  # every simulated rate, in the order simulated
    below: float | None = None  # the probe it failed (the goodput is lower); None: searched

    @property
    def goodput(self) -> float | None:
        """Requests per second; None when it failed the probe or nothing was simulated."""
        if self.below is not None or not self.trials:
            return None
        return goodput_rate([t.rate for t in self.trials], [t.attainment for t in self.trials])

    @property
    def at_capacity(self) -> bool:
        """Every simulated rate passed: the goodput is the highest one, the estimate not far above."""
        return bool(self.trials) and self.below is None and all(t.passed for t in self.trials)

    @property
    def best(self) -> Trial | None:
        """The highest passing rate's simulation: the figures the plan reports."""
        passing = [t for t in self.trials if t.passed]
        return max(passing, key=lambda t: t.rate) if passing else None


def search_rate(run: RunAt, ceiling: float, probe: float | None, steps: int) -> RateSearch:
    """Search a configuration's goodput (see the module docstring); `ceiling`: its capacity estimate."""
    trials: list[Trial] = []

    def passes(rate: float) -> bool | None:
        trial = run(rate)
        if trial is not None:
            trials.append(trial)
        return None if trial is None else trial.passed

    if probe is not None:
        if not passes(probe):
            return RateSearch(tuple(trials), probe if trials else None)
        low, high = probe, None
    else:
        low, high = _find_passing(passes, ceiling / 2, ceiling * LOWEST_FRACTION)
    if low is not None:
        _bisect(passes, low, high, ceiling, steps)
    return RateSearch(tuple(trials))


def _find_passing(passes: Callable, start: float, lowest: float) -> tuple[float | None, float | None]:
    """(a passing rate, the lowest failing one seen) from `start` down by 4x."""
    rate, failing = start, None
    while rate >= lowest:
        ok = passes(rate)
        if ok is None:
            return None, failing
        if ok:
            return rate, failing
        rate, failing = rate / 4, rate
    return None, failing


def _bisect(passes: Callable, low: float, high: float | None, bound: float, steps: int) -> None:
    """Narrow [low, high] geometrically; `bound` stands for `high` until a rate fails."""
    for _ in range(steps):
        top = high if high is not None else bound
        if top / low < CLOSE_ENOUGH:
            break
        middle = math.sqrt(low * top)
        ok = passes(middle)
        if ok is None:
            break
        low, high = (middle, high) if ok else (low, middle)
