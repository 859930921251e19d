"""Encode-ahead in the simulator: the engine's own `EncodeAhead` (epd.engine.encode_ahead: the
queue, the bound on images ahead, cancellations, the prefix-cache check and the in-step fallback,
all in epd.engine.llm_engine) with its tower on the second lane of the instance's clock
(epd.sim.gpu_share), in virtual time, with no thread.

| real engine (`TowerThread`)                 | here (`VirtualTower`)                              |
|---------------------------------------------|----------------------------------------------------|
| a job is queued for the thread              | its embeddings are computed at once; the tower's   |
|                                             | cost becomes its work on the lane (no time passes) |
| the thread encodes it, beside the steps     | its span runs on the lane, slowed while steps run  |
| `take_finished`: jobs the thread has done   | jobs whose span has ended by the instance's now    |
| `wait`: until a job is done, or the timeout | the clock moves on to the span's end, or timeout   |
"""

from __future__ import annotations

import dataclasses
from collections import deque

from epd.clock import Clock
from epd.config import EngineConfig
from epd.engine.embedders import LocalEncoder
from epd.engine.encode_ahead import AheadJob
from epd.engine.factory import ModelParts, PartsFactory
from epd.engine.mm_cache import MMCache
from epd.lifetime import Event
from epd.sim.gpu_share import SharedGpuClock, TowerSpan


class VirtualTower:
    """An `AheadTower` (epd.engine.encode_ahead) on the tower's lane of `clock`."""

    launch_seconds = 0.0  # the host's time launching the tower is not modelled

    def __init__(self, clock: SharedGpuClock, encoder: LocalEncoder) -> None:
        self.clock, self.encoder = clock, encoder
        self._jobs: deque[tuple[AheadJob, TowerSpan]] = deque()

    def put(self, job: AheadJob) -> None:
        images = [job.request.prompt.images[i] for i in job.images]
        with self.clock.tower_work() as work:
            try:
                job.embeds = self.encoder.encode(images)
            except Exception as err:  # noqa: BLE001 - as on the thread: this request fails
                job.error = f"encoding its images failed: {err}"
        self._jobs.append((job, self.clock.encode_beside(work.seconds)))

    def take_finished(self) -> list[AheadJob]:
        done = []
        while self._jobs and self._jobs[0][1].finished:
            job, span = self._jobs.popleft()
            self._record(job, span)
            done.append(job)
        return done

    @property
    def num_finished(self) -> int:
        return sum(1 for _, span in self._jobs if span.finished)

    def wait(self, timeout_s: float) -> None:
        """The engine has nothing else to run: the tower runs alone until its job ends, or the
        engine's wait times out (and it looks at its inbox again, as the real one does)."""
        limit = self.clock.now() + timeout_s
        end = self.clock.next_tower_end()
        self.clock.advance_to(limit if end is None else min(end, limit))

    def wake(self) -> None:
        """Nothing to wake: `wait` never blocks a thread."""

    def close(self) -> None:
        """No thread to stop."""

    def _record(self, job: AheadJob, span: TowerSpan) -> None:
        """The lifetime events the thread records as it starts and ends a job, at the span's times."""
        req, instance = job.request, self.encoder.instance
        for i in job.images:
            req.record(Event.ENCODE_START, span.start, instance, i)
        if job.error is None:
            for i in job.images:
                req.record(Event.ENCODE_END, span.end, instance, i)


def with_tower_lane(parts: PartsFactory) -> PartsFactory:
    """`parts`, and where its engine holds the tower and its clock has a tower lane (a
    `SharedGpuClock`), a `VirtualTower` for encode-ahead (used if the config encodes ahead)."""

    def build(
        config: EngineConfig,
        *,
        encode_locally: bool,
        mm_cache: MMCache | None,
        clock: Clock,
        instance: str | None,
    ) -> ModelParts:
        built = parts(
            config, encode_locally=encode_locally, mm_cache=mm_cache, clock=clock, instance=instance
        )
        embedder = built.runner.embedder
        if not isinstance(clock, SharedGpuClock) or not isinstance(embedder, LocalEncoder):
            return built
        return dataclasses.replace(built, ahead_tower=VirtualTower(clock, embedder))

    return build
