"""Where instances run: a `Launcher` starts each from its frozen config and answers for it after.

| launcher               | host_for(spec)             | start(cfg)                   | is_alive, kill, join |
|------------------------|----------------------------|------------------------------|----------------------|
| `LocalProcessLauncher` | the cluster's host         | a spawned process, this host | the process's        |
| `RayLauncher`          | provisional: the actor's   | an actor, on a node Ray (or  | the actor's          |
|                        | node IP, found once there  | a group's `@label`) picks    | (ray_launcher.py)    |

The launcher decides the interface each instance binds (`InstanceConfig.host`); the instance binds
its control inbox and its connector there and advertises both in `InstanceReady`, so the router
needs no address book of its own. Whether an instance is still needed is not the launcher's
business either: an instance exits when the router's heartbeats stop (epd.cluster.heartbeat), so
it need not be the launcher's child.
"""

from __future__ import annotations

import multiprocessing as mp
from collections.abc import Iterable
from typing import Protocol

from epd.cluster.instance import InstanceConfig, instance_main
from epd.cluster.layout import InstanceSpec
from epd.cluster.spawn import children_report_to, start_process

KILL_WAIT_S = 5.0  # for the OS to reap a killed process: it cannot refuse, so this is only a bound


class LaunchedInstance(Protocol):
    """One started instance, as its launcher sees it (the router sees it through `is_alive`)."""

    @property
    def name(self) -> str: ...

    def is_alive(self) -> bool:
        """Whether it still runs (cheap: the router asks on every poll)."""
        ...

    def kill(self) -> None:
        """Stop it now, without asking (it gets no chance to clean up); returns without waiting."""
        ...

    def join(self, timeout_s: float | None = None) -> None:
        """Wait until it stopped, at most timeout_s (None: for ever)."""
        ...

    @property
    def exitcode(self) -> int | None:
        """Its exit status once stopped (negative: the signal that killed it); None while it runs
        or where the launcher cannot know."""
        ...


class Launcher(Protocol):
    def host_for(self, spec: InstanceSpec) -> str:
        """The interface (IP) the instance of `spec` binds and advertises: reachable from the router
        and from the instances it exchanges data with."""
        ...

    def start(self, cfg: InstanceConfig) -> LaunchedInstance:
        """Start the instance; returns at once: it reports `InstanceReady` (or `InstanceFailed`) to
        `cfg.router_address` when built."""
        ...


class LocalProcess:
    """An instance in a process of this machine (multiprocessing, spawned)."""

    def __init__(self, name: str, process: mp.process.BaseProcess) -> None:
        self._name, self.process = name, process

    @property
    def name(self) -> str:
        return self._name

    def is_alive(self) -> bool:
        return self.process.is_alive()

    def kill(self) -> None:
        self.process.kill()

    def join(self, timeout_s: float | None = None) -> None:
        self.process.join(timeout_s)

    @property
    def exitcode(self) -> int | None:
        return self.process.exitcode

    @property
    def pid(self) -> int | None:
        return self.process.pid


class LocalProcessLauncher:
    """Every instance in a spawned process of this machine, bound on `host`."""

    def __init__(self, host: str = "127.0.0.1") -> None:
        self.host = host

    def host_for(self, spec: InstanceSpec) -> str:
        return self.host

    def start(self, cfg: InstanceConfig) -> LocalProcess:
        # A child that dies re-running an unguarded main module reports there (epd.cluster.spawn).
        with children_report_to(cfg.router_address):
            return LocalProcess(cfg.name, start_process(cfg.name, instance_main, cfg))


LAUNCHERS = ("local", "ray")


def make_launcher(name: str, ray_address: str | None = None, host: str = "127.0.0.1") -> Launcher:
    """The launcher called `name`: local processes on `host`, or Ray actors on the cluster at
    `ray_address` (None: Ray's default; epd.cluster.ray_launcher, which needs `epd[ray]`)."""
    if name == "local":
        return LocalProcessLauncher(host)
    if name == "ray":
        from epd.cluster.ray_launcher import RayLauncher

        return RayLauncher(ray_address)
    raise ValueError(f"unknown launcher {name!r}; expected one of {', '.join(LAUNCHERS)}")


def kill_all(instances: Iterable[LaunchedInstance]) -> None:
    """Kill whatever still runs and wait until it is gone (bounded)."""
    alive = [i for i in instances if i.is_alive()]
    for instance in alive:
        instance.kill()
    for instance in alive:
        instance.join(KILL_WAIT_S)
