"""Which tensor-parallel rank the model being constructed is for.

The model classes build their decoder themselves (a VL model makes its `Qwen2Model` from its
config), so the rank reaches the layers through this scoped context rather than through every
constructor: `epd.parallel.build` constructs a rank's model inside `building_rank(group)`, and
the decoder's layers read `building_group()` once, at construction. Outside the block it is
None and the layers are the single-device ones. A context variable, so that a model built in
another thread at the same time (in-process clusters build instances side by side) is not
touched; blocks do not nest.

The vision tower has a switch of its own (`split_vision`), off by default: a tensor-parallel
build holds the whole tower on every rank (replicated) unless it asks for the split one, whose
layers read `building_vision_group()` (epd.parallel.vision).
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from contextvars import ContextVar

from epd.parallel.group import TensorParallelGroup, is_parallel

_BUILDING: ContextVar[TensorParallelGroup | None] = ContextVar("epd_tp_building", default=None)
_BUILDING_VISION: ContextVar[TensorParallelGroup | None] = ContextVar("epd_tp_building_vision", default=None)


@contextmanager
def building_rank(group: TensorParallelGroup, *, split_vision: bool = False) -> Iterator[None]:
    """Layers constructed in this block hold `group.rank`'s share of their weights: the decoder's
    always, the vision tower's only with `split_vision` (else the tower is whole: replicated)."""
    if _BUILDING.get() is not None or _BUILDING_VISION.get() is not None:
        raise RuntimeError("a tensor-parallel build is already under way: builds do not nest")
    parallel = group if is_parallel(group) else None
    token = _BUILDING.set(parallel)
    vision_token = _BUILDING_VISION.set(parallel if split_vision else None)
    try:
        yield
    finally:
        _BUILDING_VISION.reset(vision_token)
        _BUILDING.reset(token)


def building_group() -> TensorParallelGroup | None:
    """The group of the rank being built; None on a single device (and outside any build)."""
    return _BUILDING.get()


def building_vision_group() -> TensorParallelGroup | None:
    """The group the vision tower being built is split over; None: the tower is whole (a single
    device, a replicated tower, or outside any build)."""
    return _BUILDING_VISION.get()
