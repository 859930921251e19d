"""How long an engine step will take, predicted before it runs: what SLO scheduling plans with.

The scheduler asks two things of a `StepEstimator` (epd.engine.scheduler):
- the time of the step it is forming (decodes + prefill chunks), to keep it within the tightest
  TPOT target of the requests decoding (part 3 of SLO scheduling);
- the time a waiting request's prefill takes if it is served next, to tell whether it can still
  meet its TTFT deadline (late requests are served best-effort after the others, or refused).

A step is described as it is computed: per sequence, (new tokens, tokens computed before them,
prompt length). Two estimators:

| estimator          | from                                   | before it knows anything      |
|--------------------|----------------------------------------|-------------------------------|
| `CostModelEstimator` | a cost model: `--slo-profile` (a fitted | always ready                  |
|                    | `epd profile`), or any `ComputeCosts`  |                               |
| `OnlineEstimator`  | this engine's own recent steps: least  | None (no cap, nobody late)    |
|                    | squares of seconds on (1, tokens,      | until `MIN_OBSERVATIONS` steps|
|                    | sequences) over the last `WINDOW`      |                               |

None means "no estimate": the scheduler then caps nothing and calls nobody late, so a cold
engine behaves exactly as without SLOs rather than acting on a guess.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

if TYPE_CHECKING:
    from epd.engine.scheduler import ScheduledBatch
    from epd.engine.scripted_runner import ComputeCosts


@dataclass(frozen=True)
class Seq:
    """One sequence of a step: `new` tokens computed after `computed` ones, of a `prompt`-token prompt."""

    new: int
    computed: int
    prompt: int

    # The names the cost models read off a scheduled request (epd.plan.profile.costs).
    @property
    def num_computed_tokens(self) -> int:
        return self.computed

    @property
    def num_prompt_tokens(self) -> int:
        return self.prompt


class StepEstimator(Protocol):
    def step_seconds(self, seqs: Sequence[Seq]) -> float | None:
        """Predicted seconds of one step over `seqs`; None: no estimate yet."""
        ...

    def observe(self, seqs: Sequence[Seq], seconds: float) -> None:
        """A step over `seqs` took `seconds` (measured on the engine's clock)."""
        ...

    def observe_counts(self, tokens: int, sequences: int, seconds: float) -> None:
        """The same for a step known only by its totals: what the engine reports after every step
        (building each sequence's `Seq` costs a decode step of 256 sequences 0.12 ms on this
        project's 2-core CI machine)."""
        ...


def batch_seqs(batch: ScheduledBatch) -> list[Seq]:
    """The shape of a scheduled step, before its tokens are counted as computed."""
    return [
        Seq(n, req.num_computed_tokens, req.num_prompt_tokens)
        for req, n in zip(batch.requests, batch.num_new_tokens)
    ]


@dataclass(frozen=True)
class Queue:
    """What an engine holds when a waiting request would be served next, in the order its steps
    take tokens (epd.engine.scheduler): `decodes` (one token each, every step), then `ahead` (the
    rest of the prompts being prefilled), then the request, then `behind` (waiting prompts that
    fill what the budget leaves). `budget`: tokens per step; `chunked`: prompts split over steps."""

    decodes: tuple[Seq, ...]
    ahead: int
    behind: int
    budget: int
    chunked: bool


def served_next_seconds(estimator: StepEstimator, queue: Queue, own: Seq) -> float | None:
    """Predicted seconds until the request `own` (`own.new` tokens still to compute) has its first
    token if it were served next: the steps the engine would run, packed as it packs them. None:
    the estimator has no estimate yet."""
    ahead, tokens, behind, computed = queue.ahead, own.new, queue.behind, own.computed
    room = max(1, queue.budget - len(queue.decodes))
    total = 0.0
    while tokens > 0:
        first = min(ahead, room)
        mine = min(tokens, room - first) if queue.chunked else (tokens if first == 0 else 0)
        fill = min(behind, max(0, room - first - mine))
        seqs = [
            *queue.decodes,
            *_fresh(first),
            *([Seq(mine, computed, own.prompt)] if mine else ()),
            *_fresh(fill),
        ]
        seconds = estimator.step_seconds(seqs)
        if seconds is None:
            return None
        total += seconds
        ahead, tokens, behind, computed = ahead - first, tokens - mine, behind - fill, computed + mine
    return total


def _fresh(tokens: int) -> tuple[Seq, ...]:
    """Tokens of other prompts in a step, as one sequence (their context is not known here)."""
    return (Seq(tokens, 0, tokens),) if tokens else ()


class CostModelEstimator:
    """Predictions of a cost model (`ComputeCosts`: a fitted profile's, or the simulator's linear one).
    It learns nothing from what it observes: the model is the truth it was told."""

    def __init__(self, costs: ComputeCosts) -> None:
        self.costs = costs

    def step_seconds(self, seqs: Sequence[Seq]) -> float | None:
        from epd.engine.scheduler import ScheduledBatch  # the scheduler imports this module

        # Seq reads like a scheduled request to the cost models (num_computed_tokens, num_prompt_tokens).
        batch = ScheduledBatch(list(seqs), [s.new for s in seqs])  # type: ignore[arg-type]
        return self.costs.step_seconds(batch)

    def observe(self, seqs: Sequence[Seq], seconds: float) -> None:
        pass

    def observe_counts(self, tokens: int, sequences: int, seconds: float) -> None:
        pass


WINDOW = 64  # recent steps the online fit reads: the instance's load changes, old steps mislead
MIN_OBSERVATIONS = 4


class OnlineEstimator:
    """seconds ~= a + b * tokens + c * sequences, least squares over this engine's last `WINDOW`
    steps, every coefficient >= 0 (a term whose fit goes negative is dropped and the rest refit)."""

    def __init__(self, window: int = WINDOW, min_observations: int = MIN_OBSERVATIONS) -> None:
        self._rows: deque[tuple[float, float, float]] = deque(maxlen=window)
        self._seconds: deque[float] = deque(maxlen=window)
        self.min_observations = min_observations
        self._coefficients: np.ndarray | None = None  # None: refit on the next prediction

    def step_seconds(self, seqs: Sequence[Seq]) -> float | None:
        if len(self._seconds) < self.min_observations:
            return None
        if self._coefficients is None:
            self._coefficients = self._fit()
        return float(self._coefficients @ np.array(_features(seqs)))

    def observe(self, seqs: Sequence[Seq], seconds: float) -> None:
        self.observe_counts(sum(s.new for s in seqs), len(seqs), seconds)

    def observe_counts(self, tokens: int, sequences: int, seconds: float) -> None:
        if sequences and math.isfinite(seconds) and seconds >= 0:
            self._rows.append((1.0, float(tokens), float(sequences)))
            self._seconds.append(seconds)
            self._coefficients = None

    def _fit(self) -> np.ndarray:
        x, y = np.array(self._rows), np.array(self._seconds)
        kept = [0, 1, 2]
        while True:
            solution = np.linalg.lstsq(x[:, kept], y, rcond=None)[0]
            if (solution >= 0).all() or len(kept) == 1:
                break
            kept.pop(int(np.argmin(solution)))
        coefficients = np.zeros(3)
        coefficients[kept] = np.maximum(solution, 0.0)
        return coefficients


def _features(seqs: Sequence[Seq]) -> tuple[float, float, float]:
    return (1.0, float(sum(s.new for s in seqs)), float(len(seqs)))


def make_step_estimator(slo_profile: str | None) -> StepEstimator:
    """--slo-profile's fitted cost model, else an estimator fitted online to the engine's own steps."""
    if slo_profile is None:
        return OnlineEstimator()
    from epd.plan.profile.store import load_profile

    try:
        costs = load_profile(slo_profile).compute_costs()
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"--slo-profile {slo_profile!r} cannot be read as an epd profile: {err}") from err
    return CostModelEstimator(costs)


def prefill_seconds_of(slo_profile: str | None) -> Callable[[int], float] | None:
    """A prompt's whole prefill (one step, nothing cached) as `slo_profile`'s cost model prices it,
    for the router's encode deadlines (Urgency.later_s); None without a profile."""
    if slo_profile is None:
        return None
    estimator = make_step_estimator(slo_profile)

    def seconds(tokens: int) -> float:
        return estimator.step_seconds([Seq(tokens, 0, tokens)]) or 0.0

    return seconds
