"""A linear cost model of compute: a few parameters, until `epd profile` fits real ones.

An engine forward costs a fixed launch overhead plus a price per token computed and per sequence in
the batch; a vision batch a fixed overhead plus a price per patch. The defaults are in the range of a
small VLM on one GPU. The only promise is the `ComputeCosts` shape (epd.engine.scripted_runner):
a fitted model replaces this one without touching the harness.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, fields, replace

from epd.engine.scheduler import ScheduledBatch


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
