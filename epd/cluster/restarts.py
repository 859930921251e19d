"""Dead instances are started again through their launcher, with backoff and a limit.

The router decides that an instance is down (its launcher says it is gone, or it went silent: a
fenced instance may still run, so it is killed first); this brings a fresh one up from the same
frozen config. It rejoins with empty caches once its `InstanceReady` reaches the router, which
then places work on it again (RouterCore._instance_ready).

| state    | event                                              | next     | what happens                |
|----------|----------------------------------------------------|----------|-----------------------------|
| up       | the router marks it down                           | waiting  | next try after the backoff  |
| waiting  | backoff over, restarts left                        | starting | kill what is left, start    |
| waiting  | no restarts left (`max_restarts`)                  | given up | it stays down, logged once  |
| starting | the router has it alive again (InstanceReady)      | up       | heartbeats resume           |
| starting | the new process dies before it is ready            | waiting  | the backoff doubles         |
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.heartbeat import HeartbeatSender
from epd.cluster.instance import InstanceConfig
from epd.cluster.launcher import LaunchedInstance, Launcher
from epd.cluster.router import InstanceHandle, Router

logger = logging.getLogger(__name__)

FIRST_BACKOFF_S = 1.0
MAX_BACKOFF_S = 30.0
MAX_RESTARTS = 5  # per instance, over the cluster's life: a crash loop is a bug to look at


@dataclass
class _Restarts:
    """One instance's restart record, kept for the cluster's life (the limit counts them all)."""

    count: int = 0  # restarts begun
    backoff_s: float = FIRST_BACKOFF_S
    not_before: float | None = None  # when the next try may start; None while it is up
    starting: bool = False
    given_up: bool = False


class Restarter:
    def __init__(
        self,
        launcher: Launcher,
        configs: dict[str, InstanceConfig],
        launched: dict[str, LaunchedInstance],
        heartbeats: HeartbeatSender,
        clock: Clock = WALL_CLOCK,
        max_restarts: int = MAX_RESTARTS,
    ) -> None:
        self.launcher, self.configs, self.launched = launcher, configs, launched
        self.heartbeats, self.clock, self.max_restarts = heartbeats, clock, max_restarts
        self.records: dict[str, _Restarts] = {}

    def restarts(self) -> dict[str, int]:
        """Restarts begun, per instance (for metrics)."""
        return {name: r.count for name, r in self.records.items() if r.count}

    def tick(self, router: Router) -> None:
        """Move every instance along the table above; cheap when all are up."""
        now = self.clock.monotonic()
        for name, handle in router.instances.items():
            record = self.records.setdefault(name, _Restarts())
            if handle.alive:
                if record.starting:
                    self._came_up(name, handle, record)
                record.not_before = None
            elif record.starting:
                if not self.launched[name].is_alive():
                    self._failed_start(name, record, now)
            elif record.given_up:
                continue
            elif record.not_before is None:
                record.not_before = now + record.backoff_s  # just seen down
            elif now >= record.not_before:
                self._start(name, handle, record)

    def _start(self, name: str, handle: InstanceHandle, record: _Restarts) -> None:
        if record.count >= self.max_restarts:
            record.given_up = True
            logger.error("%s: down, and not restarted again (%d restarts so far)", name, record.count)
            return
        old = self.launched.get(name)
        if old is not None and old.is_alive():
            old.kill()  # fenced (it went silent): its late messages are ignored, but it must go
        record.count += 1
        logger.warning("%s: restarting (restart %d of at most %d)", name, record.count, self.max_restarts)
        try:
            launched = self.launcher.start(self.configs[name])
        except Exception:  # the launcher could not start it (resources, a remote node): retry later
            logger.exception("%s: the launcher could not start it", name)
            self._failed_start(name, record, self.clock.monotonic())
            return
        record.starting = True
        self.launched[name] = launched
        handle.is_alive = launched.is_alive  # the router probes the new process

    def _came_up(self, name: str, handle: InstanceHandle, record: _Restarts) -> None:
        record.starting = False
        record.backoff_s = FIRST_BACKOFF_S
        self.heartbeats.add(name, handle.ready.control_address)  # replaces the dead one's socket

    def _failed_start(self, name: str, record: _Restarts, now: float) -> None:
        record.starting = False
        record.backoff_s = min(record.backoff_s * 2, MAX_BACKOFF_S)
        record.not_before = now + record.backoff_s
        logger.error("%s: the restarted instance died before it was ready", name)
