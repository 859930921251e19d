"""An instance's virtual clock with its GPU shared by two lanes: the engine's steps, and the vision
tower encoding ahead beside them (epd.engine.encode_ahead), in virtual time.

| lane  | what runs on it                                  | its work, in solo seconds, given by |
|-------|--------------------------------------------------|-------------------------------------|
| steps | every forward and any tower run inside a step    | `advance(seconds)`: what the runner |
|       | (the cost model's time, epd.engine.scripted_     | and the scripted tower spend, as on |
|       | runner), an E instance's encode batches          | any virtual clock                   |
| tower | jobs encoded ahead, one after another (FIFO)     | `encode_beside(seconds)`            |

Interference rule (one parameter, `overlap_speed`): while both lanes have work, each runs at
`overlap_speed` of its solo speed; a lane alone runs at full speed. `advance_to` (the instance
idle, or its engine waiting for an encode) runs the tower alone.

The default, 0.63, is the tower's span alone over its span beside the steps on one H200
(BENCHMARKS.md, "Encode-ahead's stream at a higher CUDA priority": 4 requests of 3 x 1280x960
images beside 32 decodes and 2048-token chunks, stream priority 0: 345.3 ms in the steps, 548.3
ms ahead), given to the steps too. The burst's end checks it roughly: the steps' own work there
(~635 ms: 980 ms in the steps less the tower) and ~9 more decode steps of ~6 ms beside a tower
at 0.63 end ~890 ms after it began, against 923 and 1006 ms measured in two runs (the steps ran
at ~0.45-0.57 of their speed by that reckoning). At 0.63 the GPU does 1.26x the work of either
lane alone while both run: the serving runs (BENCHMARKS.md, "Encode-ahead under load") gained
1-9% in requests/s. It ignores: that the eager tower there is bound by launching its kernels from
Python (its span equals its launch time; `--vision-cuda-graphs` or another host shifts the
figure); that a decode step and a 2048-token chunk do not slow alike; the stream's priority; and
the host CPU the two lanes share (in-process 1EPD: with the API process's threads too).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from epd.clock import VirtualClock

DEFAULT_OVERLAP_SPEED = round(345.3 / 548.3, 2)  # see the module docstring
# Work left below this is rounding (a job worn down by many steps): the job has ended.
DONE_S = 1e-12


@dataclass
class TowerSpan:
    """One job on the tower's lane: its solo seconds left; when it started and ended (None: not yet)."""

    work: float
    start: float | None = None
    end: float | None = None

    @property
    def finished(self) -> bool:
        return self.end is not None


@dataclass
class TowerWork:
    """Solo seconds the tower's compute spent inside `SharedGpuClock.tower_work`."""

    seconds: float = 0.0


class SharedGpuClock(VirtualClock):
    def __init__(self, overlap_speed: float = DEFAULT_OVERLAP_SPEED, start: float = 0.0) -> None:
        if not 0 < overlap_speed <= 1:
            raise ValueError(f"overlap_speed must be in (0, 1], got {overlap_speed}")
        super().__init__(start)
        self.overlap_speed = overlap_speed
        self._tower: deque[TowerSpan] = deque()  # unfinished, the first one running
        self._work: TowerWork | None = None  # set inside tower_work

    # ---- the steps' lane ----------------------------------------------------------------------

    def advance(self, seconds: float) -> None:
        """Compute that takes `seconds` alone on the steps' lane: time moves on by that, more where
        the tower runs beside it. Inside `tower_work`: the tower's work, and time stays."""
        if seconds < 0:
            raise ValueError(f"compute cannot take negative time ({seconds} s)")
        if self._work is not None:
            self._work.seconds += seconds
            return
        while seconds > 0 and self._tower:
            seconds = self._beside_tower(seconds)
        super().advance(seconds)

    def _beside_tower(self, step_work: float) -> float:
        """Both lanes run until one of them is done; the steps' work left."""
        span = self._tower[0]  # both at the same speed: the one with less work left ends first
        if span.work <= step_work:
            super().advance(span.work / self.overlap_speed)
            left = step_work - span.work
            self._finish_first()
            return left
        span.work -= step_work
        super().advance(step_work / self.overlap_speed)
        self._finish_empty()
        return 0.0

    def advance_to(self, when: float) -> None:
        """Nothing runs on the steps' lane until `when`: the tower's runs alone, at full speed."""
        if when < self.now():
            raise ValueError(f"a clock cannot go back ({when - self.now()} s)")
        while self._tower and self.now() + self._tower[0].work <= when:
            super().advance(self._tower[0].work)
            self._finish_first()
        if self._tower:
            self._tower[0].work -= when - self.now()
        super().advance_to(when)

    # ---- the tower's lane ---------------------------------------------------------------------

    @contextmanager
    def tower_work(self) -> Iterator[TowerWork]:
        """Inside, `advance` counts the tower's work instead of moving time: the scripted tower
        spends its cost on the clock it was given, and here that cost becomes a job's length."""
        self._work = TowerWork()
        try:
            yield self._work
        finally:
            self._work = None

    def encode_beside(self, seconds: float) -> TowerSpan:
        """A job of `seconds` alone on the tower's lane, after those queued there: its span, whose
        `end` is set once the clock has passed it."""
        span = TowerSpan(seconds, start=None if self._tower else self.now())
        self._tower.append(span)
        self._finish_empty()
        return span

    def next_tower_end(self) -> float | None:
        """When the running job ends if nothing runs beside it (None: the lane is idle)."""
        return self.now() + self._tower[0].work if self._tower else None

    def _finish_first(self) -> None:
        span = self._tower.popleft()
        span.work, span.end = 0.0, self.now()
        if self._tower:
            self._tower[0].start = self.now()
        self._finish_empty()

    def _finish_empty(self) -> None:
        """A job with no work left ends now (free costs: as it starts)."""
        if self._tower and self._tower[0].work <= DONE_S:
            self._finish_first()
