"""What a layout could serve at most: the workload's compute per request and role, against the
instances that hold each role. The search orders layouts by it, starts each rate search under it
and skips a layout whose estimate is below a rate already reached.

Work per request and role, from the cost model, each at its cheapest (the largest batch):

| role | seconds per request                                                                |
|------|------------------------------------------------------------------------------------|
| E    | one vision batch of every distinct image of the workload, / requests                |
| P    | one prefill step of every prompt, / requests                                       |
| D    | (output tokens - 1) x the cheapest per-token decode step among the batch limits     |

Capacity: a rate r can be served only if, for every set R of roles, the instances holding any of
R have the time for R's work: r * sum(work[R]) <= instances(R). The smallest of the seven ratios
is the estimate, and its R the limiting roles. With costs that grow at most linearly with batch
size (the fitted and the linear models do) this is an upper bound of what the simulator serves:
queueing, SLOs and transfers only take from it; a prompt that hits the prefix cache could beat it.

Tensor-parallel instances (`@tpN`) do a role's work faster by the ratio of its work at degree 1 to
its work at N (`by_degree`: the work priced by each degree's costs). Counting each instance as that
many degree-1 instances, the one that holds several of R's roles at its fastest among them, keeps
the bound: an instance gives each role a share of its time, and no share does more than the fastest
role's worth of degree-1 work. At degree 1 every instance counts as one, as above.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from itertools import combinations

from epd.cluster.layout import ROLE_ORDER, Layout, Role
from epd.engine.scheduler import ScheduledBatch
from epd.engine.scripted_runner import ComputeCosts
from epd.sim.workload import SimRequest


@dataclass(frozen=True)
class StageWork:
    """Compute seconds one request needs of each role, at best batching."""

    encode: float
    prefill: float
    decode: float

    def of(self, role: Role) -> float:
        return {Role.ENCODE: self.encode, Role.PREFILL: self.prefill, Role.DECODE: self.decode}[role]


@dataclass(frozen=True)
class Capacity:
    rate: float  # requests per second, at most
    limiting: str  # the roles whose instances run out of time first, e.g. "E" or "P+D"


@dataclass(frozen=True)
class _Row:
    """What the cost models read of a scheduled request."""

    num_computed_tokens: int
    num_prompt_tokens: int


def stage_work(costs: ComputeCosts, requests: Sequence[SimRequest], batch_limits: Sequence[int]) -> StageWork:
    """The work of an average request of `requests`; decode at the best of `batch_limits`."""
    if not requests:
        return StageWork(0.0, 0.0, 0.0)
    count = len(requests)
    images = {img.content_hash: img.grid_thw for r in requests for img in r.prompt.images}
    encode = costs.encode_seconds(list(images.values())) / count if images else 0.0
    prompts = [len(r.prompt.prompt_token_ids) for r in requests]
    prefill = costs.step_seconds(_batch([_Row(0, n) for n in prompts], prompts)) / count
    outputs = [r.params.max_tokens or 1 for r in requests]
    mean_prompt, mean_output = sum(prompts) / count, sum(outputs) / count
    context = round(mean_prompt + (mean_output - 1) / 2)  # the mean context of a decoded token
    per_token = min(_decode_token_seconds(costs, size, round(mean_prompt), context) for size in batch_limits)
    return StageWork(encode, prefill, per_token * (mean_output - 1))


def _instances_for(
    layout: Layout, roles: frozenset[Role], work: StageWork, by_degree: Mapping[int, StageWork]
) -> float:
    """The instances holding any of `roles`, each counted as the degree-1 instances it is worth."""
    total = 0.0
    for (count, held), degree in zip(layout.groups, layout.group_degrees):
        if held & roles:
            total += count * max(_speedup(work, by_degree, degree, role) for role in held & roles)
    return total


def _speedup(work: StageWork, by_degree: Mapping[int, StageWork], degree: int, role: Role) -> float:
    """How many times faster an instance of `degree` does `role`'s work than one of degree 1."""
    if degree == 1 or work.of(role) <= 0:
        return 1.0
    if degree not in by_degree:
        raise ValueError(f"no work estimate at tensor-parallel degree {degree}")
    return work.of(role) / max(by_degree[degree].of(role), 1e-12)


def _decode_token_seconds(costs: ComputeCosts, size: int, prompt: int, context: int) -> float:
    rows = [_Row(max(context, prompt), prompt)] * size
    return costs.step_seconds(_batch(rows, [1] * size)) / size


def _batch(rows: list[_Row], new_tokens: list[int]) -> ScheduledBatch:
    return ScheduledBatch(requests=rows, num_new_tokens=new_tokens)  # type: ignore[arg-type]


def capacity(layout: Layout, work: StageWork, by_degree: Mapping[int, StageWork] | None = None) -> Capacity:
    """The highest rate `layout` could sustain for `work` (see the module docstring); `by_degree`:
    the work at each tensor-parallel degree > 1 of the layout."""
    best = Capacity(math.inf, "-")
    for size in range(1, len(ROLE_ORDER) + 1):
        for roles in combinations(ROLE_ORDER, size):
            seconds = sum(work.of(role) for role in roles)
            if seconds <= 0:
                continue
            rate = _instances_for(layout, frozenset(roles), work, by_degree or {}) / seconds
            if rate < best.rate * (1 - 1e-9):  # a tie keeps the fewer roles: the simpler reason
                best = Capacity(rate, "+".join(role.value for role in roles))
    return best
