"""The automatic role-switching policy (`--role-switching auto`): a pure core, no sockets, no wall
clock. `observe(view)` takes a snapshot of the cluster (auto_load.ClusterView: roles, stats, the
work each instance holds, the recent requests, the time) and returns a switch to make, or None.

    STEADY ---- a stage's drain time >= trigger_s and >= enter_ratio x another's ----> EVALUATE
    EVALUATE -- the best candidate layout beats the current one by the margin ----> (decision) SWITCHING
    EVALUATE -- none does -------------- next evaluation after interval_s ------------> STEADY
    SWITCHING - the view shows no switch under way any more ---------------------------> STEADY

| guard               | what it prevents                                 | how                             |
|---------------------|--------------------------------------------------|---------------------------------|
| trigger_s,          | evaluating (and switching) on noise: a load that | drain times from the estimator  |
| enter_ratio         | is low, or even between stages                   | (auto_load.stage_loads)         |
| margin,             | flapping near the boundary of two layouts: the   | predicted SLO attainment +margin|
| latency_margin      | new one must win clearly, not by a hair          | or mean latency -latency_margin |
| dwell_s             | moving an instance back and forth                | no move of an instance within   |
|                     |                                                  | dwell_s of its last switch      |
| one at a time       | two drains at once, none to take the work        | nothing while view.switching    |
| legal moves only    | a role with no live instance; E on an instance   | auto_load.legal_moves           |
|                     | that cannot hold it                              |                                 |
| interval_s          | simulating on every tick                         | at most one evaluation per      |
|                     |                                                  | interval_s                      |

Candidates are the current layout with one instance moved towards the stage that takes longest to
drain (it gains that stage's role). Each is scored, with the current layout, by a `Scorer`: the
planner's simulator replaying the recent requests (auto_roles_sim.SimScorer), or the estimator's
own drain times (`DrainScorer`, cheap, for tests and as a stand-in).
"""

from __future__ import annotations

import enum
import logging
import math
from dataclasses import dataclass
from typing import Protocol

from epd.cluster.router.auto_load import (
    STAGE_NAMES,
    STAGES,
    ClusterView,
    Move,
    StageLoad,
    StatsHistory,
    UnitCosts,
    capacity,
    drain_time,
    layout_after,
    legal_moves,
    serves,
    stage_loads,
)

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class AutoRolesConfig:
    margin: float = 0.10  # predicted SLO attainment the new layout must add (a share: 0.10 = 10 points)
    latency_margin: float = 0.20  # or the share of mean latency it must take off, attainment no worse
    dwell_s: float = 30.0  # an instance stays in its roles at least this long after a switch
    window_s: float = 30.0  # the recent workload: requests that arrived within this many seconds
    max_requests: int = 48  # of which the simulator replays at most the last this many
    min_requests: int = 8  # fewer: no evaluation (nothing to predict from)
    interval_s: float = 1.0  # between two evaluations
    trigger_s: float = 0.5  # the slowest stage's drain time that is worth a look
    enter_ratio: float = 2.0  # ... if it is this many times another stage's

    def __post_init__(self) -> None:
        for name in ("margin", "latency_margin", "dwell_s", "window_s", "interval_s", "trigger_s"):
            if not getattr(self, name) >= 0:
                raise ValueError(f"role switching: {name} must be >= 0, not {getattr(self, name)!r}")
        if self.max_requests < 1 or self.min_requests < 1:
            raise ValueError("role switching: max_requests and min_requests must be >= 1")
        if self.enter_ratio < 1:
            raise ValueError(f"role switching: enter_ratio must be >= 1, not {self.enter_ratio!r}")


@dataclass(frozen=True)
class RoleSwitchingOptions:
    """`--role-switching auto` and its knobs, as the engine options give them (epd.entrypoints.options)."""

    config: AutoRolesConfig = AutoRolesConfig()
    profile: str | None = None  # the cost model's profile (epd profile); None: linear, calibrated
    slo_ttft_s: float | None = None
    slo_tpot_s: float | None = None


@dataclass(frozen=True)
class Score:
    attainment: float  # share of the replayed requests within the SLOs (1.0 without SLOs)
    mean_latency_s: float  # mean end-to-end latency of the replayed requests

    def describe(self) -> str:
        return f"attainment {self.attainment:.0%}, mean latency {self.mean_latency_s:.3f} s"


class Scorer(Protocol):
    def score(self, layout: tuple[str, ...], view: ClusterView) -> Score:
        """The predicted service of `view`'s recent workload on `layout` (role letters per instance)."""
        ...


@dataclass(frozen=True)
class Decision:
    instance: str
    roles: str  # what it switches to
    stage: str  # the stage it relieves ("encode", "prefill", "decode"): the metrics' reason label
    reason: str  # for the log: the loads and the scores that decided


class PolicyState(enum.Enum):
    STEADY = "steady"
    SWITCHING = "switching"


class AutoRoles:
    def __init__(
        self, config: AutoRolesConfig, scorer: Scorer, units: UnitCosts, calibrate: bool = False
    ) -> None:
        """`calibrate`: take per-token seconds from the instances' stats (no profile: auto_load)."""
        self.config, self.scorer, self.units, self.calibrate = config, scorer, units, calibrate
        self.state = PolicyState.STEADY
        self.next_evaluation = -math.inf
        self.history = StatsHistory()
        self.evaluations = 0  # how many times candidates were scored

    def observe(self, view: ClusterView) -> Decision | None:
        """A switch to make now, or None (module docstring: the state machine)."""
        self.history.update(view)
        if view.switching is not None:
            self.state = PolicyState.SWITCHING
            return None
        self.state = PolicyState.STEADY
        if view.now < self.next_evaluation:
            return None
        loads = stage_loads(view, self.current_units(), self.history.busy)
        bottleneck = self._bottleneck(loads)
        if bottleneck is None or len(self._window(view)) < self.config.min_requests:
            return None
        moves = [m for m in legal_moves(view) if self._relieves(m, bottleneck) and self._dwelt(view, m)]
        if not moves:
            return None
        self.next_evaluation = view.now + self.config.interval_s
        return self._evaluate(view, moves, loads, bottleneck)

    def current_units(self) -> UnitCosts:
        return self.history.observed(self.units) if self.calibrate else self.units

    # ---- inside -------------------------------------------------------------------------------

    def _bottleneck(self, loads: dict[str, StageLoad]) -> str | None:
        """The stage that takes longest to drain, if it is slow enough and well above another."""
        served = [load for load in loads.values() if load.instances > 0 or load.work > 0]
        worst = max(served, key=lambda load: load.drain_s, default=None)
        if worst is None or worst.drain_s < self.config.trigger_s:
            return None
        least = min(load.drain_s for load in served)
        if worst.drain_s < self.config.enter_ratio * least:
            return None
        return worst.stage

    @staticmethod
    def _relieves(move: Move, stage: str) -> bool:
        return serves(move.after, stage) and not serves(move.before, stage)

    def _dwelt(self, view: ClusterView, move: Move) -> bool:
        last = next(i.last_switched for i in view.instances if i.name == move.instance)
        return last is None or view.now - last >= self.config.dwell_s

    def _window(self, view: ClusterView) -> tuple:
        recent = [r for r in view.recent if view.now - r.arrival <= self.config.window_s]
        return tuple(recent[-self.config.max_requests :])

    def _evaluate(
        self, view: ClusterView, moves: list[Move], loads: dict[str, StageLoad], stage: str
    ) -> Decision | None:
        self.evaluations += 1
        window = ClusterView(view.now, view.instances, view.switching, self._window(view))
        current = self.scorer.score(view.layout(), window)
        scored = [(self.scorer.score(layout_after(view, m), window), m) for m in moves]
        held = {i.name: sum(self.units.of(s) * n for s, n in i.work.items()) for i in view.instances}
        # Equal predictions: the instance with the least work to drain switches soonest.
        best, move = max(
            scored, key=lambda pair: (pair[0].attainment, -pair[0].mean_latency_s, -held[pair[1].instance])
        )
        summary = "; ".join(load.describe() for load in loads.values())
        if not self._beats(best, current):
            logger.info(
                "role switching: %s is the bottleneck (%s) but no move wins by the margin "
                "(now %s; best %s -> %s: %s)",
                *(
                    STAGE_NAMES[stage],
                    summary,
                    current.describe(),
                    move.instance,
                    move.after,
                    best.describe(),
                ),
            )
            return None
        reason = f"{summary}; predicted {current.describe()} -> {best.describe()}"
        return Decision(move.instance, move.after, STAGE_NAMES[stage], reason)

    def _beats(self, new: Score, old: Score) -> bool:
        c = self.config
        if new.attainment >= old.attainment + c.margin:
            return True
        faster = new.mean_latency_s <= old.mean_latency_s * (1 - c.latency_margin)
        return new.attainment >= old.attainment and faster


class DrainScorer:
    """Scores a layout by the estimator alone: the work held now, shared by the capacity that would
    serve each stage (auto_load.capacity); the mean latency is the sum of the stages' drain times
    (a request passes through each). No SLOs: attainment is 1. Cheap; what the policy's tests use."""

    def __init__(self, units: UnitCosts) -> None:
        self.units = units

    def score(self, layout: tuple[str, ...], view: ClusterView) -> Score:
        total = 0.0
        for stage in STAGES:
            work = sum(i.work.get(stage, 0) for i in view.instances if i.alive)
            total += drain_time(work, self.units.of(stage), capacity(layout, stage))
        return Score(1.0, total)
