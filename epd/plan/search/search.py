"""The search: which layout and knobs serve the workload best on the GPUs given.

    goodput mode (no --rate), on exactly --gpus GPUs:
      1. screen: every candidate layout at the engine's default knobs, in order of capacity
         estimate (epd.plan.search.capacity); a layout whose estimate is below the best goodput so
         far is skipped unsimulated, one that fails at that goodput costs one simulation
      2. tune: the `tune_top` best layouts get `knob_trials` more knob settings each (seeded
         pattern search, epd.plan.search.knobs), each one a rate search that must beat the
         layout's best so far
      3. queue order: with `policies` to choose from (the workload has a TTFT SLO), the
         `policy_top` best layouts, at their best knobs, get `policy_trials` per-stage
         --scheduling-policy settings each (epd.plan.search.policies), each to beat as above
    GPU mode (--rate R): the same search on 1, 2, ... GPUs with R as the rate every configuration
      must pass, until some configuration passes; its ranking is by goodput as above. With nothing
      passing at n GPUs, the layouts closest to passing (highest attainment at R) are tuned.

With tensor-parallel degrees allowed (`degrees`, `epd plan --tp 1,2`), the layouts of n GPUs include
`@tpN` groups (epd.plan.search.layouts), each simulated with the profile's costs at its degrees.

Everything is deterministic: the layouts' order, the simulations (same requests at every rate) and
the knob order (the seed). The simulation budget (`max_simulations`) may end the search early; the
result says so.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial

from epd.cluster.layout import Layout
from epd.engine.queue_policy import StagePolicies
from epd.engine.scripted_runner import ComputeCosts
from epd.plan.search.capacity import Capacity, StageWork, capacity, stage_work
from epd.plan.search.evaluate import Config, Evaluator, Trial
from epd.plan.search.knobs import Knobs, KnobSpace, proposals
from epd.plan.search.layouts import INSTANCE_KINDS, candidate_layouts
from epd.plan.search.policies import policy_proposals
from epd.plan.search.rates import RateSearch, search_rate
from epd.sim.costs import costs_at_degree
from epd.sim.workload import SimRequest


@dataclass(frozen=True)
class SearchSettings:
    gpus: int  # goodput mode: exactly this many; GPU mode: at most
    rate: float | None = None  # GPU mode: the rate to serve
    kinds: tuple[str, ...] = INSTANCE_KINDS
    layouts: tuple[Layout, ...] = ()  # only these (their GPU counts as given); (): every valid one
    degrees: tuple[int, ...] = (1,)  # tensor-parallel degrees a P or D kind may run at
    space: KnobSpace = field(default_factory=KnobSpace)
    tune_top: int = 3
    knob_trials: int = 4
    scheduling_policy: str = "fcfs"  # the plan's own --scheduling-policy: where its search starts
    policies: tuple[str, ...] = ()  # queue policies a stage may take; fewer than 2: not searched
    policy_top: int = 2
    policy_trials: int = 2
    rate_steps: int = 3
    seed: int = 0


@dataclass(frozen=True)
class Candidate:
    """One configuration and what the search learnt of it."""

    config: Config
    capacity: Capacity
    search: RateSearch | None  # None: skipped, its capacity estimate below the rate to beat;
    # no trials: the simulation budget was spent before it

    @property
    def goodput(self) -> float | None:
        return None if self.search is None else self.search.goodput

    @property
    def best(self) -> Trial | None:
        return None if self.search is None else self.search.best

    @property
    def simulations(self) -> int:
        return 0 if self.search is None else len(self.search.trials)

    def rank_key(self) -> tuple:
        """Best first: goodput; at equal goodput the most SLO headroom at it; without one, the
        closest to passing the rate to beat; then the text, the knobs and the queue policy, the
        plan's own before one policy for every stage before a mix (a stable order)."""
        first = self.search.trials[0].attainment if self.search and self.search.trials else -1.0
        goodput = -1.0 if self.goodput is None else self.goodput
        use = self.best.slo_use if self.best is not None else math.inf
        return (
            -goodput,
            use,
            -first,
            self.config.layout.text,
            self.config.knobs,
            *_policy_key(self.config.policy),
        )


@dataclass(frozen=True)
class PlanResult:
    settings: SearchSettings
    candidates: tuple[Candidate, ...]  # of the GPU count chosen, every configuration looked at
    gpus: int | None  # the GPUs of the plan (GPU mode: the fewest that serve the rate; None: none do)
    simulations: int
    exhausted: bool  # the budget ended the search

    @property
    def ranked(self) -> list[Candidate]:
        """Configurations with a goodput, best first."""
        return sorted((c for c in self.candidates if c.goodput is not None), key=Candidate.rank_key)

    @property
    def winner(self) -> Candidate | None:
        ranked = [c for c in self.ranked if c.best is not None]
        return ranked[0] if ranked and self.gpus is not None else None


Progress = Callable[[Candidate], None]


class Planner:
    def __init__(
        self, evaluator: Evaluator, settings: SearchSettings, progress: Progress = lambda c: None
    ) -> None:
        self.evaluator, self.settings, self.progress = evaluator, settings, progress
        self.workload: tuple[ComputeCosts, list[SimRequest]] | None = None  # of the first layout
        self.work: dict[int, StageWork] = {}  # by tensor-parallel degree

    def plan(self) -> PlanResult:
        s = self.settings
        if s.rate is None:
            return self._result(self.search_gpus(s.gpus, None), s.gpus)
        candidates: list[Candidate] = []
        for gpus in range(1, s.gpus + 1):
            candidates = self.search_gpus(gpus, s.rate)
            if any(c.goodput is not None for c in candidates):
                return self._result(candidates, gpus)
            if self.evaluator.exhausted:
                break
        return self._result(candidates, None)

    def search_gpus(self, gpus: int, floor: float | None) -> list[Candidate]:
        """Screen every layout of `gpus` GPUs, then tune the best; `floor`: a rate all must pass."""
        layouts = self._layouts(gpus)
        if not layouts:
            return []
        estimates = self._estimates(layouts)
        candidates: list[Candidate] = []
        for layout in sorted(layouts, key=lambda lay: (-estimates[lay].rate, lay.text)):
            start = Config(layout, self.settings.space.start(layout))
            candidates.append(self._evaluate(start, estimates[layout], floor, candidates))
        for leader in sorted(candidates, key=Candidate.rank_key)[: self.settings.tune_top]:
            if leader.search is not None:
                candidates += self._tune(leader, floor)
        if len(self.settings.policies) > 1:
            for leader in self._best_per_layout(candidates)[: self.settings.policy_top]:
                candidates += self._tune_policy(leader, candidates, floor)
        return candidates

    def _base_policy(self) -> str:
        """The plan's own --scheduling-policy, in its shortest form: where the policy search starts."""
        return StagePolicies.parse(self.settings.scheduling_policy).text

    @staticmethod
    def _best_per_layout(candidates: list[Candidate]) -> list[Candidate]:
        """The best simulated configuration of each layout, best first."""
        best: dict[str, Candidate] = {}
        for c in sorted(candidates, key=Candidate.rank_key):
            if c.search is not None and c.goodput is not None:
                best.setdefault(c.config.layout.text, c)
        return list(best.values())

    def _layouts(self, gpus: int) -> list[Layout]:
        if self.settings.layouts:
            return [layout for layout in self.settings.layouts if layout.num_devices == gpus]
        return candidate_layouts(gpus, self.settings.kinds, self.settings.degrees)

    def _estimates(self, layouts: list[Layout]) -> dict[Layout, Capacity]:
        work = self._work(layouts[0], 1)
        degrees = sorted({d for layout in layouts for d in layout.group_degrees if d > 1})
        by_degree = {degree: self._work(layouts[0], degree) for degree in degrees}
        return {layout: capacity(layout, work, by_degree) for layout in layouts}

    def _work(self, layout: Layout, degree: int) -> StageWork:
        """The work per request at `degree` (ValueError: the costs lack that degree)."""
        if self.workload is None:
            self.workload = self.evaluator.workload(Config(layout, self.settings.space.start(layout)))
        if degree not in self.work:
            costs, requests = self.workload
            limits = self.settings.space.max_num_seqs
            self.work[degree] = stage_work(costs_at_degree(costs, degree), requests, limits)
        return self.work[degree]

    def _evaluate(
        self, config: Config, estimate: Capacity, floor: float | None, rivals: list[Candidate]
    ) -> Candidate:
        """`config`'s goodput, if it can beat the best of `rivals` (and pass `floor`)."""
        rates = [g for g in (floor, *(c.goodput for c in rivals)) if g is not None and g > 0]
        probe = max(rates, default=None)
        if probe is not None and estimate.rate < probe:
            return Candidate(config, estimate, None)
        run = partial(self.evaluator.run, config)
        candidate = Candidate(
            config, estimate, search_rate(run, estimate.rate, probe, self.settings.rate_steps)
        )
        if candidate.simulations:
            self.progress(candidate)
        return candidate

    def _tune(self, leader: Candidate, floor: float | None) -> list[Candidate]:
        """Up to `knob_trials` other knobs for the leader's layout, each to beat the best so far."""
        layout, seed = leader.config.layout, self.settings.seed
        best: Knobs = leader.config.knobs
        tried, found = {best}, [leader]
        for _ in range(self.settings.knob_trials):
            knobs = next(proposals(self.settings.space, layout, best, tried, seed), None)
            if knobs is None or self.evaluator.exhausted:
                break
            tried.add(knobs)
            config = Config(layout, knobs, leader.config.policy)
            found.append(self._evaluate(config, leader.capacity, floor, found))
            best = min(found, key=Candidate.rank_key).config.knobs
        return found[1:]

    def _tune_policy(
        self, leader: Candidate, candidates: list[Candidate], floor: float | None
    ) -> list[Candidate]:
        """Up to `policy_trials` other queue policies for the leader's layout and knobs, each to beat
        the best of that layout so far."""
        layout, knobs = leader.config.layout, leader.config.knobs
        rivals = [c for c in candidates if c.config.layout == layout]
        base = self._base_policy()
        best = leader.config.policy or base
        tried = {c.config.policy or base for c in rivals if c.config.knobs == knobs}
        found: list[Candidate] = []
        for _ in range(self.settings.policy_trials):
            policy = next(policy_proposals(self.settings.policies, layout, best, tried), None)
            if policy is None or self.evaluator.exhausted:
                break
            tried.add(policy)
            config = Config(layout, knobs, policy)
            found.append(self._evaluate(config, leader.capacity, floor, rivals + found))
            best = min([leader, *found], key=Candidate.rank_key).config.policy or best
        return found

    def _result(self, candidates: list[Candidate], gpus: int | None) -> PlanResult:
        e = self.evaluator
        return PlanResult(self.settings, tuple(candidates), gpus, e.spent, e.exhausted)


def _policy_key(policy: str | None) -> tuple[bool, bool, str]:
    """Orders equally good queue policies: the plan's own (None) first, then one for every stage."""
    return (policy is not None, policy is not None and "=" in policy, policy or "")
