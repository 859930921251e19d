"""Compute time by role in one simulation, for the bottleneck column of the plan.

`RoleTimer` wraps the cost model every instance of a simulated cluster prices its work with and
adds each price to a role: vision batches to E, engine steps to P and D by their rows (a decode row
is one token past its prompt; a step mixing prefill chunks and decodes is split by tokens). The
busy share of a role is then its time over what the instances holding it had:

    share[role] = seconds[role] / (instances holding role x run duration)

exact for single-role instances; for shared ones (EPD) it is their average over the roles' work,
whatever order they did it in. The role with the highest share is the bottleneck.

Read decode's share with care: a decode instance is busy whenever one request decodes, and a step
of 100 rows costs little more than one of 10, so D at 100% may still take a larger batch; encode
and prefill costs grow with the work, and their shares are close to how loaded they are.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from epd.cluster.layout import ROLE_ORDER, Layout, Role
from epd.engine.scheduler import ScheduledBatch
from epd.engine.scripted_runner import ComputeCosts, Grid
from epd.plan.search.layouts import capable
from epd.sim.costs import costs_at_degree


@dataclass
class RoleTimer:
    """A `ComputeCosts` that prices as `costs` does and keeps the total per role."""

    costs: ComputeCosts
    seconds: dict[Role, float] = field(default_factory=lambda: dict.fromkeys(ROLE_ORDER, 0.0))

    def step_seconds(self, batch: ScheduledBatch) -> float:
        cost = self.costs.step_seconds(batch)
        decoded = sum(
            n
            for request, n in zip(batch.requests, batch.num_new_tokens)
            if n == 1 and request.num_computed_tokens >= request.num_prompt_tokens
        )
        total = max(batch.total_tokens, 1)
        self.seconds[Role.DECODE] += cost * decoded / total
        self.seconds[Role.PREFILL] += cost * (total - decoded) / total
        return cost

    def at_degree(self, degree: int) -> RoleTimer:
        """Prices as the costs do at tensor-parallel `degree`, into the same totals."""
        return RoleTimer(costs_at_degree(self.costs, degree), self.seconds)

    def encode_seconds(self, grids: Sequence[Grid]) -> float:
        cost = self.costs.encode_seconds(grids)
        self.seconds[Role.ENCODE] += cost
        return cost

    def busy_shares(self, layout: Layout, duration: float) -> dict[str, float]:
        """Share of its instances' time each role kept busy, by role letter."""
        return {
            role.value: self.seconds[role] / (capable(layout, frozenset({role})) * max(duration, 1e-9))
            for role in ROLE_ORDER
        }


def bottleneck(shares: dict[str, float]) -> str:
    """'E 93%': the busiest role and its share."""
    role = max(shares, key=lambda r: (shares[r], r))
    return f"{role} {shares[role]:.0%}"
