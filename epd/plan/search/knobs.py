"""The engine limits a plan tunes per layout, and the order it tries them in.

| knob                   | `epd serve` flag           | matters where                                   |
|------------------------|----------------------------|-------------------------------------------------|
| max_num_seqs           | --max-num-seqs             | every engine: requests per running batch        |
| max_num_batched_tokens | --max-num-batched-tokens   | engines that prefill and decode (PD, EPD): the  |
|                        |                            | chunked-prefill budget, TTFT against TPOT       |

A prefill-only engine prefills whole prompts whatever the budget (epd.config.SchedulerConfig), so
a layout without PD or EPD instances leaves the budget to the engine (None: no flag). The encoder's
patch budget and the router's policies are no `epd serve` options yet: a plan cannot promise them.

Optimiser: optuna is not among the project's dependencies, so the search over these grids is a
seeded pattern search (`proposals`): first every neighbour of the best point so far (one knob one
step up or down), in an order drawn from the seed, then the rest of the grid in a seeded order;
the same seed gives the same trials.
"""

from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, replace

from epd.cluster.layout import Layout, Role

MAX_NUM_SEQS = (32, 64, 128, 256, 512)
MAX_NUM_BATCHED_TOKENS = (512, 1024, 2048, 4096, 8192, 16384)
ENGINE_DEFAULTS = (256, 2048)  # what `epd serve` uses without the flags: where a search starts


@dataclass(frozen=True, order=True)
class Knobs:
    max_num_seqs: int
    max_num_batched_tokens: int | None = None  # None: the engine's default (no flag)

    def describe(self) -> str:
        budget = "-" if self.max_num_batched_tokens is None else str(self.max_num_batched_tokens)
        return f"seqs {self.max_num_seqs}, tokens {budget}"


@dataclass(frozen=True)
class KnobSpace:
    max_num_seqs: tuple[int, ...] = MAX_NUM_SEQS
    max_num_batched_tokens: tuple[int, ...] = MAX_NUM_BATCHED_TOKENS

    def start(self, layout: Layout) -> Knobs:
        """The engine's defaults, or the choices nearest to them."""
        seqs, tokens = ENGINE_DEFAULTS
        budget = _nearest(self.max_num_batched_tokens, tokens) if chunks_prefill(layout) else None
        return Knobs(_nearest(self.max_num_seqs, seqs), budget)

    def axes(self, layout: Layout) -> dict[str, tuple[int, ...]]:
        """The knobs that change something on `layout`, with their choices."""
        axes = {"max_num_seqs": self.max_num_seqs}
        if chunks_prefill(layout):
            axes["max_num_batched_tokens"] = self.max_num_batched_tokens
        return {name: values for name, values in axes.items() if len(values) > 1}


def chunks_prefill(layout: Layout) -> bool:
    """Some instance both prefills and decodes, and so splits prompts by the token budget."""
    return any({Role.PREFILL, Role.DECODE} <= roles for _, roles in layout.groups)


def proposals(space: KnobSpace, layout: Layout, best: Knobs, tried: set[Knobs], seed: int) -> Iterator[Knobs]:
    """Untried points: the neighbours of `best` first, then the rest of the grid; seeded order."""
    rng = random.Random(f"{seed}:{layout.text}:{best}")  # str seeds hash stably across runs
    axes = space.axes(layout)
    near = [_moved(best, name, values, step) for name, values in axes.items() for step in (-1, 1)]
    near = [k for k in near if k is not None and k not in tried]
    rng.shuffle(near)
    rest = [k for k in _grid(best, axes) if k not in tried and k not in near]
    rng.shuffle(rest)
    yield from near
    yield from rest


def _moved(knobs: Knobs, name: str, values: tuple[int, ...], step: int) -> Knobs | None:
    current = getattr(knobs, name)
    index = values.index(current) + step if current in values else None
    if index is None or not 0 <= index < len(values):
        return None
    return replace(knobs, **{name: values[index]})


def _grid(base: Knobs, axes: dict[str, tuple[int, ...]]) -> list[Knobs]:
    points = [base]
    for name, values in axes.items():
        points = [replace(point, **{name: value}) for point in points for value in values]
    return points


def _nearest(values: tuple[int, ...], target: int) -> int:
    return min(values, key=lambda v: (abs(v - target), v))
