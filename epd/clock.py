"""Where serving logic reads the time: a `Clock`, never the time module directly.

| clock          | now()                          | monotonic()         | used by                        |
|----------------|--------------------------------|---------------------|--------------------------------|
| `WallClock`    | time.time(): timestamps, which | time.monotonic():   | production (instance processes,|
|                | the processes of one host share| durations, deadlines| router, offline API, server)   |
| `VirtualClock` | set by whoever drives it       | the same value      | tests, the simulator           |

The router, engines, encoder workers and lifetime events take a clock, so the same code runs
on the wall clock in production and on a virtual clock in the simulator and in deterministic
tests, where time only moves when the driver says so.
"""

from __future__ import annotations

import time
from typing import Protocol


class Clock(Protocol):
    def now(self) -> float:
        """Seconds since the epoch (or the virtual start): what lifetime events record."""
        ...

    def monotonic(self) -> float:
        """Seconds that never go back: for durations and deadlines."""
        ...


class WallClock:
    """The machine's clocks."""

    def now(self) -> float:
        return time.time()

    def monotonic(self) -> float:
        return time.monotonic()


class VirtualClock:
    """Time that moves only when advanced: deterministic runs and simulated hours in seconds."""

    def __init__(self, start: float = 0.0) -> None:
        self._now = start

    def now(self) -> float:
        return self._now

    def monotonic(self) -> float:
        return self._now

    def advance(self, seconds: float) -> None:
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds} s)")
        self._now += seconds

    def advance_to(self, when: float) -> None:
        if when < self._now:
            raise ValueError(f"a clock cannot go back ({when - self._now} s)")
        # Exactly `when`: now + (when - now) can land one rounding step short of it (0.1024... ->
        # 1.1932...), and an instance's clock a step behind the simulation's went back.
        self._now = when


WALL_CLOCK = WallClock()
