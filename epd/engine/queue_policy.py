"""The order a stage serves its queue in: first come first served, by deadline, or by priority.

The encoder worker's job queue and the engine scheduler's waiting queue both ask a `QueuePolicy`
for each entry's `key` (smaller: served sooner) and serve the smallest first. What a key says:

| tier | who                                                        | then ordered by           |
|------|------------------------------------------------------------|---------------------------|
| 0    | waited longer than `max_wait_s` since arrival (starving)   | arrival                   |
| 1    | slo: can still meet its deadline / priority: every request | slo: (deadline, arrival)  |
|      |                                                            | / (priority, arrival)     |
| 2    | slo: no deadline (no --slo-ttft, no per-request slo_ttft)  | arrival                   |
| 3    | slo: late: misses its deadline even if served next         | (deadline, arrival)       |

Late: slack = deadline - now - predicted time still to spend here < 0. The prediction is the
caller's (`remaining_s`: the scheduler's step estimator, epd.engine.step_estimator), else
`token_s` per prompt token and `patch_s` per image patch still to compute. A late request is
served best-effort after every request that can still make it (or, with --reject-late, refused
by the scheduler before it asks for keys), so that it does not make others late too.

Why the earliest deadline and not the least slack among those that can make it: on one server
whose queue is all there, serving by deadline meets every deadline whenever any order does
(Jackson's rule); least slack does not: A needs 4 s by 6 s (slack 2), B 1 s by 4 s (slack 3):
least slack serves A first and B misses, by deadline both make it. tests/engine/test_slo_exhaustive.py
checks that against every order on the engine.

No starvation: a request that has waited `max_wait_s` is served before anything that has not,
whatever its deadline or priority, so under a steady stream of more urgent work it waits at most
`max_wait_s` plus the time the starving ones ahead of it take (FCFS among them).

`fcfs` keeps every stage exactly as it was (the scheduler never asks it for keys: `reorders`).

Per stage (`StagePolicies`, --scheduling-policy encode=slo,prefill=fcfs,decode=slo): each stage
orders its own queue. A plain name means every stage; a stage not named keeps fcfs.

| stage   | whose queue                                                                 |
|---------|-----------------------------------------------------------------------------|
| encode  | an encoder instance's job queue (epd.cluster.encoder_worker)                |
| prefill | the waiting queue of an engine that prefills (P, PD, EP, EPD, aggregated);  |
|         | also the router's choice of P (epd.cluster.router.placement)                |
| decode  | the waiting queue of a decode-only engine (D: hand-offs waiting for a slot) |
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from dataclasses import dataclass

import msgspec

POLICIES = ("fcfs", "slo", "priority")
STAGES = ("encode", "prefill", "decode")
DEFAULT_MAX_WAIT_S = 10.0
# What the slack estimate charges, until a fitted profile (epd.plan.profile) is wired in: the
# linear model's defaults (epd.sim.costs.LinearCosts).
DEFAULT_TOKEN_S = 20e-6
DEFAULT_PATCH_S = 2e-6


class Urgency(msgspec.Struct, frozen=True):
    """What a queue knows of a request's hurry (it travels in `EncodeTask`). `slo_ttft` None: the
    policy's default (maybe none). `arrival_time`: at the router, on its clock. `later_s`: the
    seconds the request will still need after this stage (an encoder's: the prefill that follows,
    as the router predicts it), so this stage's deadline is the TTFT deadline minus them: across
    stages, one budget."""

    arrival_time: float
    slo_ttft: float | None = None
    priority: int = 0  # lower: sooner (vLLM's convention)
    later_s: float = 0.0


class QueuePolicy(ABC):
    """Orders a queue. `key(urgency, work_tokens, work_patches, now)`: smaller is served sooner;
    equal keys keep arrival order (callers sort stably, in arrival order)."""

    name = "fcfs"
    reorders = True

    def __init__(
        self,
        default_slo_ttft: float | None = None,
        max_wait_s: float = DEFAULT_MAX_WAIT_S,
        token_s: float = DEFAULT_TOKEN_S,
        patch_s: float = DEFAULT_PATCH_S,
    ) -> None:
        self.default_slo_ttft, self.max_wait_s = default_slo_ttft, max_wait_s
        self.token_s, self.patch_s = token_s, patch_s

    def deadline(self, urgency: Urgency) -> float | None:
        """When this stage must be done for the request to make its TTFT (None: no deadline)."""
        slo = urgency.slo_ttft if urgency.slo_ttft is not None else self.default_slo_ttft
        return None if slo is None else urgency.arrival_time + slo - urgency.later_s

    def key(
        self,
        urgency: Urgency,
        now: float,
        tokens: int = 0,
        patches: int = 0,
        remaining_s: float | None = None,
    ) -> tuple[float, ...]:
        """`remaining_s`: predicted seconds still to spend here if served next; None: `tokens` and
        `patches` at the default prices."""
        if now - urgency.arrival_time >= self.max_wait_s:
            return (0, urgency.arrival_time)
        if remaining_s is None:
            remaining_s = tokens * self.token_s + patches * self.patch_s
        return self._key(urgency, now, remaining_s)

    @abstractmethod
    def _key(self, urgency: Urgency, now: float, remaining_s: float) -> tuple[float, ...]: ...

    def slack(self, urgency: Urgency, now: float, remaining_s: float) -> float:
        """Seconds to spare if served now; inf without a deadline."""
        deadline = self.deadline(urgency)
        return math.inf if deadline is None else deadline - now - remaining_s

    def is_late(self, urgency: Urgency, now: float, remaining_s: float) -> bool:
        """It misses its deadline even if served next (never, without a deadline)."""
        return self.slack(urgency, now, remaining_s) < 0


class Fcfs(QueuePolicy):
    name = "fcfs"
    reorders = False

    def _key(self, urgency: Urgency, now: float, remaining_s: float) -> tuple[float, ...]:
        return (1, urgency.arrival_time)


class EarliestDeadlineFirst(QueuePolicy):
    """Earliest deadline first among the requests that can still meet theirs; see the module docstring."""

    name = "slo"

    def _key(self, urgency: Urgency, now: float, remaining_s: float) -> tuple[float, ...]:
        deadline = self.deadline(urgency)
        if deadline is None:
            return (2, urgency.arrival_time)
        tier = 3 if self.is_late(urgency, now, remaining_s) else 1
        return (tier, deadline, urgency.arrival_time)


class PriorityFirst(QueuePolicy):
    name = "priority"

    def _key(self, urgency: Urgency, now: float, remaining_s: float) -> tuple[float, ...]:
        return (1, urgency.priority, urgency.arrival_time)


_BY_NAME: dict[str, type[QueuePolicy]] = {
    "fcfs": Fcfs,
    "slo": EarliestDeadlineFirst,
    "priority": PriorityFirst,
}


def make_queue_policy(
    name: str = "fcfs", default_slo_ttft: float | None = None, max_wait_s: float = DEFAULT_MAX_WAIT_S
) -> QueuePolicy:
    if name not in _BY_NAME:
        raise ValueError(f"unknown scheduling policy {name!r}; choose from {', '.join(POLICIES)}")
    return _BY_NAME[name](default_slo_ttft, max_wait_s)


FCFS = Fcfs()


@dataclass(frozen=True)
class StagePolicies:
    """The queue policy of each stage, by name (see the module docstring)."""

    encode: str = "fcfs"
    prefill: str = "fcfs"
    decode: str = "fcfs"

    def __post_init__(self) -> None:
        for stage in STAGES:
            _check_policy(getattr(self, stage), stage)

    @classmethod
    def parse(cls, text: str) -> StagePolicies:
        """'slo' (every stage) or 'encode=slo,decode=fcfs' (the stages not named: fcfs); ValueError
        naming the bad part otherwise."""
        text = text.strip()
        if "=" not in text:
            _check_policy(text, "every stage")
            return cls(text, text, text)
        chosen: dict[str, str] = {}
        for item in (part.strip() for part in text.split(",")):
            stage, _, name = (half.strip() for half in item.partition("="))
            if stage not in STAGES:
                raise ValueError(f"unknown stage {stage!r} in {text!r}; stages: {', '.join(STAGES)}")
            if stage in chosen:
                raise ValueError(f"stage {stage!r} named twice in {text!r}")
            _check_policy(name, stage)
            chosen[stage] = name
        return cls(**chosen)

    @property
    def text(self) -> str:
        """The shortest text `parse` reads back as these: a plain name when every stage agrees."""
        names = [getattr(self, stage) for stage in STAGES]
        if len(set(names)) == 1:
            return names[0]
        return ",".join(f"{stage}={name}" for stage, name in zip(STAGES, names))

    def of(self, stage: str) -> str:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; stages: {', '.join(STAGES)}")
        return getattr(self, stage)


def _check_policy(name: str, stage: str) -> None:
    if name not in POLICIES:
        raise ValueError(f"unknown scheduling policy {name!r} for {stage}; choose from {', '.join(POLICIES)}")
