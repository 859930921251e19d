"""A linear cost model of compute: a few parameters, until `epd profile` fits real ones.

An engine forward costs a fixed launch overhead plus a price per token computed and per sequence in
the batch; a vision batch a fixed overhead plus a price per patch. The defaults are in the range of a
small VLM on one GPU. The only promise is the `ComputeCosts` shape (epd.engine.scripted_runner):
a fitted model replaces this one without touching the harness.

Tensor-parallel instances (`@tpN`): a cost model that knows degrees (`DegreeCosts`: a profile's,
epd.plan.profile.costs) gives each instance the costs of its degree, and refuses one it lacks; any
other model (these linear costs, a test's) prices every instance alike, whatever its degree.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace
from typing import Protocol, runtime_checkable

from epd.engine.scheduler import ScheduledBatch
from epd.engine.scripted_runner import ComputeCosts


@dataclass(frozen=True)
class LinearCosts:
    step_s: float = 4e-3  # per engine forward
    token_s: float = 20e-6  # per token computed (prefill tokens dominate)
    sequence_s: float = 50e-6  # per request in the batch (decode: reading its KV)
    encode_s: float = 2e-3  # per vision batch
    patch_s: float = 2e-6  # per image patch encoded

    def step_seconds(self, batch: ScheduledBatch) -> float:
        return self.step_s + self.token_s * batch.total_tokens + self.sequence_s * len(batch)

    def encode_seconds(self, grids: Sequence[tuple[int, int, int]]) -> float:
        return self.encode_s + self.patch_s * sum(t * h * w for t, h, w in grids)


@runtime_checkable
class DegreeCosts(Protocol):
    def at_degree(self, degree: int) -> ComputeCosts:
        """The costs of an instance of tensor-parallel `degree`; ValueError for one not known."""
        ...


def costs_at_degree(costs: ComputeCosts, degree: int) -> ComputeCosts:
    """What an instance of tensor-parallel `degree` computes at (see the module docstring)."""
    return costs.at_degree(degree) if isinstance(costs, DegreeCosts) else costs


def check_degrees(costs: ComputeCosts, degrees: Sequence[int]) -> None:
    """ValueError, before anything is simulated, when `costs` lack one of a layout's degrees."""
    for degree in sorted(set(degrees)):
        costs_at_degree(costs, degree)


FREE = LinearCosts(0.0, 0.0, 0.0, 0.0, 0.0)  # compute takes no time: only transfers and messages do


def parse_costs(text: str, base: LinearCosts = LinearCosts()) -> LinearCosts:
    """'step_s=4e-3,patch_s=1e-5' -> `base` with those fields set (ValueError for unknown names)."""
    names = {f.name for f in fields(LinearCosts)}
    values = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, sep, value = item.partition("=")
        if not sep or name.strip() not in names:
            raise ValueError(f"not NAME=SECONDS with NAME one of {', '.join(sorted(names))}: {item!r}")
        values[name.strip()] = float(value)
    if any(v < 0 for v in values.values()):
        raise ValueError(f"costs must be >= 0: {text!r}")
    return replace(base, **values)
