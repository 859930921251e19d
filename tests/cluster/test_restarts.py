"""The restart state machine (epd.cluster.restarts) on a virtual clock, with a router whose instances
are only names and a launcher that starts nothing: when it tries, how it backs off, when it stops.
(Restarts of real processes: tests/cluster/test_failures.py.)"""

from __future__ import annotations

from router_harness import FakeLayout

from epd.clock import VirtualClock
from epd.cluster.heartbeat import HeartbeatSender
from epd.cluster.messages import InstanceReady
from epd.cluster.restarts import FIRST_BACKOFF_S, Restarter
from epd.cluster.router import InMemoryControlPlane, Router


class Started:
    """What the launcher hands back: an instance without a process, alive until told otherwise."""

    def __init__(self, name: str) -> None:
        self.name, self.alive, self.exitcode = name, True, None

    def is_alive(self) -> bool:
        return self.alive

    def kill(self) -> None:
        self.alive = False

    def join(self, timeout_s: float | None = None) -> None:
        pass


class CountingLauncher:
    """Starts `Started` instances; the first `failures` starts raise, as a launcher that cannot."""

    def __init__(self, failures: int = 0) -> None:
        self.failures, self.started = failures, []

    def host_for(self, spec) -> str:
        return "127.0.0.1"

    def start(self, cfg) -> Started:
        if self.failures:
            self.failures -= 1
            raise OSError("no resources")
        self.started.append(Started(cfg))
        return self.started[-1]


def setup(launcher: CountingLauncher, max_restarts: int = 5):
    clock = VirtualClock()
    fake, control = FakeLayout("1E+1P+1D"), InMemoryControlPlane()
    router = Router(fake.handles, control, clock)
    heartbeats = HeartbeatSender()
    launched = {name: Started(name) for name in router.instances}
    configs = {name: name for name in router.instances}  # the launcher here only echoes it
    restarter = Restarter(launcher, configs, launched, heartbeats, clock, max_restarts)
    return clock, fake, control, router, restarter, heartbeats


def ready(control: InMemoryControlPlane, name: str, pid: int) -> None:
    control.post(InstanceReady(name, "tcp://127.0.0.1:9", f"data://{name}-{pid}", pid, 0, 0, 4096))


def test_a_dead_instance_is_restarted_after_the_backoff_and_rejoins_when_ready():
    launcher = CountingLauncher(failures=1)
    clock, fake, control, router, restarter, heartbeats = setup(launcher)
    try:
        fake.kill("D0")
        router.poll(timeout_ms=0)
        restarter.tick(router)
        assert launcher.started == [], "not before the backoff"
        clock.advance(FIRST_BACKOFF_S)
        restarter.tick(router)  # the launcher fails: the backoff doubles
        assert launcher.started == [] and restarter.restarts() == {"D0": 1}
        clock.advance(FIRST_BACKOFF_S)
        restarter.tick(router)
        assert launcher.started == [], "the backoff doubled"
        clock.advance(FIRST_BACKOFF_S)
        restarter.tick(router)
        assert [s.name for s in launcher.started] == ["D0"] and restarter.restarts() == {"D0": 2}
        assert not router.instances["D0"].alive, "down until it says it is ready"
        assert router.instances["D0"].is_alive(), "the router now probes the new instance"

        ready(control, "D0", 2)
        router.poll(timeout_ms=0)
        restarter.tick(router)
        assert router.instances["D0"].alive and router.instances["D0"].ready.pid == 2
        clock.advance(100 * FIRST_BACKOFF_S)
        restarter.tick(router)
        assert [s.name for s in launcher.started] == ["D0"], "up: nothing more to do"
    finally:
        heartbeats.stop()


def test_an_instance_that_keeps_dying_is_given_up_after_max_restarts():
    launcher = CountingLauncher()
    clock, fake, control, router, restarter, heartbeats = setup(launcher, max_restarts=2)
    try:
        router.instances["D0"].is_alive = lambda: False
        router.poll(timeout_ms=0)
        for _ in range(10):
            clock.advance(60.0)
            restarter.tick(router)
            if launcher.started and launcher.started[-1].alive:
                launcher.started[-1].alive = False  # dies before it is ready
        assert len(launcher.started) == 2 and restarter.restarts() == {"D0": 2}
        assert not router.instances["D0"].alive
    finally:
        heartbeats.stop()
