"""What the automatic role switching (auto_roles.py) sees: a snapshot of the cluster, the load of each
stage turned into seconds, and the single-instance moves the switching mechanism allows.

| stage | served by                 | work (from the router's ledger) | drain time, per serving instance |
|-------|---------------------------|---------------------------------|----------------------------------|
| E     | instances with E, not P   | image patches being encoded     | patches x seconds per patch      |
| P     | instances with P          | prompt tokens not yet prefilled | tokens x seconds per token       |
| D     | instances with D          | output tokens still to generate | tokens x seconds per token in a  |
|       |                           | (max_tokens - tokens so far)    | decode batch                     |

The seconds per unit come from the profile's cost model when there is one (`UnitCosts.from_costs`);
without one, from what the instances report (`StatsHistory.observed`: seconds in steps per token
computed, on instances that only prefill or only decode), falling back to the simulator's linear
defaults until they have reported. Queue lengths, busy shares and cache use ride along for the log:
the drain time is the one number compared.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from epd.engine.scheduler import ScheduledBatch
from epd.engine.scripted_runner import ComputeCosts
from epd.inputs.types import ProcessedPrompt
from epd.sampling_params import SamplingParams

STAGES = ("E", "P", "D")
STAGE_NAMES = {"E": "encode", "P": "prefill", "D": "decode"}
# Role sets an instance may be moved to. EPD is left out: an aggregated instance of a disaggregated
# layout runs a local connector and may not switch (epd.cluster.instance.roles).
TARGETS = ("E", "P", "D", "EP", "PD")


@dataclass(frozen=True)
class InstanceView:
    """One instance as the policy sees it: roles (letters), what it loaded, its stats and work."""

    name: str
    roles: str
    alive: bool = True
    has_language: bool = True  # loaded the language model (P and D need it)
    has_vision: bool = False  # loaded the vision tower (E needs it)
    switchable: bool = False  # both parts in host memory: E may move (--switchable-roles)
    stats: Mapping[str, float] = field(default_factory=dict)
    work: Mapping[str, int] = field(default_factory=dict)  # stage letter -> units (table above)
    last_switched: float | None = None  # when its last switch ended (monotonic seconds)

    def serves(self, stage: str) -> bool:
        """An instance with E and P encodes only its own requests: it is no encoder for others."""
        return serves(self.roles, stage)


def serves(roles: str, stage: str) -> bool:
    if stage == "E":
        return "E" in roles and "P" not in roles
    return stage in roles


def capacity(layout: Sequence[str], stage: str) -> float:
    """Instances' worth of time for `stage`: an instance that serves k stages gives each 1/k (its
    steps are shared), so moving P to PD is not free capacity."""
    total = 0.0
    for roles in layout:
        if serves(roles, stage):
            total += 1 / sum(serves(roles, s) for s in STAGES)
    return total


@dataclass(frozen=True)
class RecentRequest:
    """A request the router saw arrive: what the simulator replays to score a layout."""

    arrival: float  # monotonic seconds
    prompt: ProcessedPrompt
    params: SamplingParams


@dataclass(frozen=True)
class ClusterView:
    now: float  # monotonic seconds
    instances: tuple[InstanceView, ...]
    switching: str | None = None  # the instance whose switch is under way, if any
    recent: tuple[RecentRequest, ...] = ()

    def layout(self) -> tuple[str, ...]:
        """The role letters of every live instance."""
        return tuple(i.roles for i in self.instances if i.alive)


@dataclass(frozen=True)
class UnitCosts:
    """Seconds per unit of each stage's work on one instance (module table)."""

    patch_s: float
    prefill_token_s: float
    decode_token_s: float

    @classmethod
    def from_costs(cls, costs: ComputeCosts) -> UnitCosts:
        """Read off a cost model at typical shapes: a 64x64-patch image, a 2048-token prefill, a
        decode batch of 32 sequences at 1024 tokens of context."""
        patch = costs.encode_seconds([(1, 64, 64)]) / 4096
        prefill = costs.step_seconds(_batch([(2048, 0, 2048)])) / 2048
        decode = costs.step_seconds(_batch([(1, 1024, 1000)] * DECODE_BATCH)) / DECODE_BATCH
        return cls(patch, prefill, decode)

    def of(self, stage: str) -> float:
        return {"E": self.patch_s, "P": self.prefill_token_s, "D": self.decode_token_s}[stage]

    def scaled(self, factors: Mapping[str, float]) -> UnitCosts:
        return UnitCosts(
            self.patch_s * factors.get("E", 1.0),
            self.prefill_token_s * factors.get("P", 1.0),
            self.decode_token_s * factors.get("D", 1.0),
        )


DECODE_BATCH = 32


@dataclass
class _Seq:
    """What a cost model reads of a scheduled request (epd.plan.profile.costs, epd.sim.costs)."""

    num_computed_tokens: int
    num_prompt_tokens: int


def _batch(seqs: Sequence[tuple[int, int, int]]) -> ScheduledBatch:
    """(new tokens, computed tokens, prompt tokens) per sequence -> a batch a cost model prices."""
    batch = ScheduledBatch()
    for new, computed, prompt in seqs:
        batch.requests.append(_Seq(computed, prompt))  # type: ignore[arg-type]
        batch.num_new_tokens.append(new)
        batch.samples.append(True)
    return batch


@dataclass(frozen=True)
class StageLoad:
    stage: str
    instances: int
    work: int
    drain_s: float  # work x unit cost / capacity (inf: work and nobody to do it)
    queued: float  # requests (images for E) waiting in the serving instances' queues
    busy: float  # mean share of time the serving instances spent in steps since the last look
    cache_use: float  # the fullest serving instance's KV cache (MM cache for E)

    def describe(self) -> str:
        return (
            f"{STAGE_NAMES[self.stage]}: {self.drain_s:.2f} s to drain on {self.instances} "
            f"({self.queued:g} queued, {self.busy:.0%} busy, cache {self.cache_use:.0%})"
        )


def stage_loads(
    view: ClusterView, units: UnitCosts, busy: Mapping[str, float] | None = None
) -> dict[str, StageLoad]:
    """Each stage's load now (module table); `busy`: instance -> busy share, where known."""
    busy = busy or {}
    live = [i for i in view.instances if i.alive and i.name != view.switching]
    loads = {}
    for stage in STAGES:
        serving = [i for i in live if i.serves(stage)]
        work = sum(i.work.get(stage, 0) for i in view.instances if i.alive)
        loads[stage] = StageLoad(
            stage,
            len(serving),
            work,
            drain_time(work, units.of(stage), capacity([i.roles for i in serving], stage)),
            sum(_queued(i, stage) for i in serving),
            sum(busy.get(i.name, 0.0) for i in serving) / max(1, len(serving)),
            max((_cache_use(i, stage) for i in serving), default=0.0),
        )
    return loads


def drain_time(work: int, unit_s: float, instances: float) -> float:
    if work == 0:
        return 0.0
    return math.inf if instances == 0 else work * unit_s / instances


def _queued(instance: InstanceView, stage: str) -> float:
    key = "encode_queue_images" if stage == "E" else "waiting_requests"
    return instance.stats.get(key, 0.0)


def _cache_use(instance: InstanceView, stage: str) -> float:
    return instance.stats.get("mm_cache_usage" if stage == "E" else "kv_cache_usage", 0.0)


class StatsHistory:
    """The instances' counters at the last look, for rates over the time between two looks."""

    def __init__(self) -> None:
        self._last: dict[str, tuple[float, Mapping[str, float]]] = {}
        self.busy: dict[str, float] = {}  # instance -> share of the last interval spent in steps
        self._token_s: dict[str, list[float]] = {"P": [], "D": []}

    def update(self, view: ClusterView) -> None:
        token_s: dict[str, list[float]] = {"P": [], "D": []}
        for instance in view.instances:
            previous = self._last.get(instance.name)
            if previous is not None and previous[1] == instance.stats:
                continue  # no report since the last look (instances report every 0.25 s)
            self._last[instance.name] = (view.now, dict(instance.stats))
            if previous is None or view.now <= previous[0]:
                continue
            seconds = _delta(instance.stats, previous[1], "step_seconds_total")
            steps = _delta(instance.stats, previous[1], "steps_total")
            self.busy[instance.name] = min(1.0, max(0.0, seconds / (view.now - previous[0])))
            tokens = steps * instance.stats.get("last_batch_tokens", 0.0)
            if instance.roles in token_s and tokens > 0 and seconds > 0:
                token_s[instance.roles].append(seconds / tokens)
        self._token_s = token_s

    def observed(self, units: UnitCosts) -> UnitCosts:
        """`units` with the per-token seconds measured since the last look, where measured."""
        factors = {
            stage: sum(values) / len(values) / units.of(stage)
            for stage, values in self._token_s.items()
            if values and units.of(stage) > 0
        }
        return units.scaled(factors)


def _delta(now: Mapping[str, float], before: Mapping[str, float], key: str) -> float:
    return max(0.0, now.get(key, 0.0) - before.get(key, 0.0))


# ---- moves the mechanism allows ---------------------------------------------------------------


@dataclass(frozen=True)
class Move:
    instance: str
    before: str
    after: str


def legal_moves(view: ClusterView) -> list[Move]:
    """Every change of one live instance to a role set of TARGETS that the switching mechanism would
    take (epd.cluster.router.role_switch, epd.cluster.instance.roles) and that leaves every stage
    the layout serves now served afterwards and, while it drains, by others."""
    moves = []
    for instance in view.instances:
        if not instance.alive or instance.roles == "EPD" or view.switching is not None:
            continue
        for target in TARGETS:
            if target != instance.roles and _allowed(instance, target) and _others_serve(view, instance):
                if _still_covered(view, instance, target):
                    moves.append(Move(instance.name, instance.roles, target))
    return moves


def _allowed(instance: InstanceView, target: str) -> bool:
    """What the instance loaded lets it take `target` (roles.refusal, for an idle instance)."""
    if instance.switchable:
        return True
    # E moves only with both parts in host memory; P <-> D on anything that has P or D (it holds
    # the language model; E-only instances were excluded just above).
    return "E" not in instance.roles and "E" not in target


def _others_serve(view: ClusterView, instance: InstanceView) -> bool:
    """While it drains, placement skips it: others take P and D, and E if it is an encoder."""
    needed = ["P", "D"] + (["E"] if instance.serves("E") else [])
    others = [i for i in view.instances if i.alive and i.name != instance.name]
    return all(any(stage in i.roles for i in others) for stage in needed)


def _still_covered(view: ClusterView, instance: InstanceView, target: str) -> bool:
    """Every role some live instance holds now, some live instance holds after the move."""
    before = [i.roles for i in view.instances if i.alive]
    after = [target if i.name == instance.name else i.roles for i in view.instances if i.alive]
    return set("".join(before)) <= set("".join(after))


def layout_after(view: ClusterView, move: Move) -> tuple[str, ...]:
    return tuple(move.after if i.name == move.instance else i.roles for i in view.instances if i.alive)
