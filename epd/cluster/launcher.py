"""Where instances run: a `Launcher` starts each from its frozen config and answers for it after.

| launcher               | host_for(spec)             | start(cfg)                   | is_alive, kill, join |
|------------------------|----------------------------|------------------------------|----------------------|
| `LocalProcessLauncher` | the cluster's host         | a spawned process, this host;| the process's (all   |
|                        |                            | at `@tpN`, N of them         | N of them)           |
| `RayLauncher`          | provisional: the actor's   | an actor, on a node Ray (or  | the actor's          |
|                        | node IP, found once there  | a group's `@label`) picks    | (ray_launcher.py)    |

The launcher decides the interface each instance binds (`InstanceConfig.host`); the instance binds
its control inbox and its connector there and advertises both in `InstanceReady`, so the router
needs no address book of its own. Whether an instance is still needed is not the launcher's
business either: an instance exits when the router's heartbeats stop (epd.cluster.heartbeat), so
it need not be the launcher's child.

A tensor-parallel instance (`@tpN`, epd.parallel) is N processes: the instance process (rank 0, on
the spec's first device) and N-1 workers (its other devices, in order), meeting at a file store
the launcher picks (`InstanceConfig.tp_init_method`). The group lives and dies as one
(`LocalGroup`): it is alive while every process is; a kill kills all; and each worker ends by
itself when rank 0 ends, however it ends (epd.parallel.lifeline), so nothing outlives its
instance. A worker that fails to build reports it as the instance's `InstanceFailed`.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import shutil
import tempfile
import time
import traceback
import weakref
from collections.abc import Iterable
from dataclasses import replace
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Protocol

import torch

from epd.cluster.instance import InstanceConfig, instance_main
from epd.cluster.instance.shell import make_connector
from epd.cluster.layout import InstanceSpec
from epd.cluster.messages import InstanceFailed
from epd.cluster.spawn import children_report_to, report_to_router, start_process
from epd.parallel.group import TensorParallelGroup, backend_for
from epd.parallel.lifeline import exit_when_cut, is_cut, lifeline
from epd.parallel.worker import build_worker
from epd.transfer.base import Connector

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

    def start(self, cfg: InstanceConfig) -> LocalProcess | LocalGroup:
        # A child that dies re-running an unguarded main module reports there (epd.cluster.spawn).
        with children_report_to(cfg.router_address):
            if cfg.spec.degree > 1:
                return start_group(cfg)
            return LocalProcess(cfg.name, start_process(cfg.name, instance_main, cfg))


class LocalGroup:
    """A tensor-parallel instance: its rank 0 (the instance process) and its workers, as one."""

    def __init__(self, name: str, processes: list[mp.process.BaseProcess], store_dir: str) -> None:
        self._name, self.processes = name, processes
        # The group's rendezvous file goes with the group object (or at exit).
        self._cleanup = weakref.finalize(self, shutil.rmtree, store_dir, True)

    @property
    def name(self) -> str:
        return self._name

    @property
    def workers(self) -> list[mp.process.BaseProcess]:
        return self.processes[1:]

    def is_alive(self) -> bool:
        """A rank that died leaves the others stuck in their next collective: the instance is gone."""
        return all(p.is_alive() for p in self.processes)

    def kill(self) -> None:
        for process in self.processes:
            if process.is_alive():
                process.kill()

    def join(self, timeout_s: float | None = None) -> None:
        deadline = None if timeout_s is None else time.monotonic() + timeout_s
        for process in self.processes:
            process.join(None if deadline is None else max(0.0, deadline - time.monotonic()))

    @property
    def exitcode(self) -> int | None:
        """Rank 0's, once it ended; else that of a worker that ended before it."""
        if self.processes[0].exitcode is not None:
            return self.processes[0].exitcode
        return next((p.exitcode for p in self.workers if p.exitcode is not None), None)

    @property
    def pid(self) -> int | None:
        return self.processes[0].pid


def start_group(cfg: InstanceConfig) -> LocalGroup:
    """Rank 0 (the instance, `instance_main`) and a worker per further device of `cfg.spec`."""
    store_dir = tempfile.mkdtemp(prefix=f"epd-tp-{cfg.name}-")
    cfg = replace(cfg, tp_init_method=(Path(store_dir) / "store").as_uri())
    ends = [lifeline() for _ in cfg.spec.worker_devices]
    processes = [start_process(cfg.name, _rank_zero_main, cfg, [held for held, _ in ends])]
    for rank, (_, watched) in enumerate(ends, start=1):
        processes.append(start_process(f"{cfg.name}.tp{rank}", _worker_main, cfg, rank, watched))
    for held, watched in ends:  # the children hold theirs: ours would keep every lifeline open
        held.close()
        watched.close()
    return LocalGroup(cfg.name, processes, store_dir)


def _rank_zero_main(cfg: InstanceConfig, lifelines: list[Connection]) -> None:
    """The instance process of a tensor-parallel instance: holds its workers' lifelines (never
    used: they close when this process ends) and joins their group as rank 0 (`instance_main`)."""
    instance_main(cfg)


def _worker_main(cfg: InstanceConfig, rank: int, watched: Connection) -> None:
    """A worker process: build its share when rank 0 says, then execute until rank 0 is gone."""
    exit_when_cut(watched)
    torch.set_num_threads(cfg.num_threads)
    device = cfg.spec.devices[rank]
    if torch.device(device).type == "cuda":
        torch.cuda.set_device(torch.device(device))
    try:
        group = TensorParallelGroup.join(cfg.tp_init_method, rank, cfg.spec.degree, backend_for(device))
        worker = build_worker(group, device, _worker_connector(cfg, device))
    except Exception:
        if not is_cut(watched, 0.0):  # rank 0 still runs: it waits in vain, say why
            error = f"tensor-parallel rank {rank} of {cfg.name} failed to build:\n{traceback.format_exc()}"
            report_to_router(cfg.router_address, InstanceFailed(cfg.name, error))
        raise SystemExit(1) from None
    try:
        worker.serve()
    except Exception:
        if is_cut(watched):  # a collective failed because rank 0 is gone: nothing to report
            os._exit(0)
        raise


def _worker_connector(cfg: InstanceConfig, device: str) -> Connector | None:
    """A prefill instance's worker sends its own heads of each hand-off (epd.parallel.kv): through
    a connector of the instance's kind, on its own device. Other workers hold none."""
    if not cfg.hands_off_kv:
        return None
    return make_connector(replace(cfg, engine=replace(cfg.engine, device=device)), cfg.transfer)


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
