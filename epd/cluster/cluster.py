"""Starts a layout's instances through a launcher, wires them to a router, stops them.

The launcher (epd.cluster.launcher; local processes by default) decides where each instance runs
and binds; each instance advertises its own addresses in InstanceReady. Start-up returns only
when every instance reported ready (or raises with the failing instance's error;
epd.cluster.spawn explains a script whose entry point is not guarded). From its InstanceReady on,
this process heartbeats each instance (epd.cluster.heartbeat), so instances outlive no router,
whoever launched them. An instance the router takes for dead is started again from its config
(epd.cluster.restarts: backoff, a limit) and rejoins with empty caches.
Shutdown asks politely, then kills: nothing is left behind, also when this
process exits without calling shutdown (a finalizer, daemon processes), and when it is killed
(the instances hear no heartbeat and exit).
"""

from __future__ import annotations

import logging
import os
import weakref
from collections.abc import Callable
from dataclasses import replace

import zmq

from epd.clock import WALL_CLOCK
from epd.cluster.heartbeat import HEARTBEAT_TIMEOUT_S, HeartbeatSender, heartbeat_interval
from epd.cluster.instance import InstanceConfig
from epd.cluster.instance.config import TRANSFER_TIMEOUT_S
from epd.cluster.launcher import LaunchedInstance, Launcher, LocalProcessLauncher, kill_all
from epd.cluster.layout import ROLE_ORDER, InstanceSpec, Layout
from epd.cluster.local_sockets import SocketDir, bind_router_locally
from epd.cluster.messages import InstanceFailed, InstanceReady, Shutdown, decode_for_router
from epd.cluster.restarts import MAX_RESTARTS, Restarter
from epd.cluster.router import InstanceHandle, Router, ZmqControlPlane
from epd.cluster.router.auto_roles import RoleSwitchingOptions
from epd.cluster.router.placement import placement_for
from epd.cluster.shared_files import SharedFiles
from epd.cluster.spawn import exited_during_startup, refuse_in_bootstrapping_child
from epd.config import EngineConfig
from epd.engine.step_estimator import prefill_seconds_of
from epd.inputs.types import ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sampling_params import SamplingParams
from epd.transfer.base import DEFAULT_RETRIES
from epd.transfer.cuda_ipc import DEFAULT_STAGING_BYTES

logger = logging.getLogger(__name__)

STARTUP_TIMEOUT_S = 300.0
# An instance's loop reports every 0.25 s; silence this long means stopped or hung. Generous, as one
# engine step (a long prefill on a slow device) delays its reports by that step's length.
SILENCE_TIMEOUT_S = 10.0
SHUTDOWN_GRACE_S = 10.0
# Image files in flight that the encoders of this host read in place (epd.cluster.shared_files): room
# for ~290 files of 3.7 MB; memory is taken only as files fill it, and a file that finds no room
# goes as ZMQ frames.
SHARED_FILE_BYTES = 1 << 30
# How long an instance found dead during start-up may take to deliver the report it sent before
# exiting (it waits until the report is out): only ever spent on a death without a report.
DEATH_REPORT_GRACE_S = 5.0


def resolve_transfer(transfer: str, devices: list[str], multi_host: bool = False) -> str:
    """`auto`: GPU to GPU through CUDA IPC when every instance is on a CUDA device of this host (as the
    local launcher starts them), else shared memory. With a launcher that may use several hosts
    (`multi_host`, Ray), `auto` stays: each pair then picks its own (epd.transfer.auto)."""
    if transfer != "auto" or multi_host:
        return transfer
    return "cuda_ipc" if all(str(d).startswith("cuda") for d in devices) else "shm"


def resolve_kv_streaming(kv_streaming: str, transfer: str) -> str:
    """`layer` sends each layer's KV as soon as prefill has written it; `request` sends all of it after
    the first token. `auto`: by layer where a transfer costs little to start (cuda_ipc: a notice and a
    device copy), by request where every send is a file or a socket message."""
    if kv_streaming not in ("auto", "layer", "request"):
        raise ValueError(f"kv_streaming must be auto, layer or request, not {kv_streaming!r}")
    if kv_streaming != "auto":
        return kv_streaming
    return "layer" if transfer == "cuda_ipc" else "request"


class Cluster:
    def __init__(
        self,
        layout: Layout,
        engine: EngineConfig,
        *,
        devices: str | list[str] = "cpu",
        transfer: str = "auto",
        kv_streaming: str = "auto",
        transfer_retries: int = DEFAULT_RETRIES,
        transfer_timeout_s: float = TRANSFER_TIMEOUT_S,
        transfer_staging_bytes: int = DEFAULT_STAGING_BYTES,
        host: str = "127.0.0.1",
        mm_cache_bytes: int = 256 << 20,
        shared_file_bytes: int = SHARED_FILE_BYTES,
        launcher: Launcher | None = None,
        heartbeat_timeout_s: float = HEARTBEAT_TIMEOUT_S,
        silence_timeout_s: float | None = SILENCE_TIMEOUT_S,
        max_restarts: int = MAX_RESTARTS,
        switchable_roles: bool = False,
        role_switching: RoleSwitchingOptions | None = None,
    ) -> None:
        """`host`: where the router's inbox binds, and every instance with the default launcher
        (local processes); another launcher picks each instance's host itself. Instances exit when
        they hear nothing from this process for `heartbeat_timeout_s`; the router takes an instance
        that sends nothing for `silence_timeout_s` (stopped, hung) for dead and redoes its work.
        A failed transfer is sent again `transfer_retries` times on the same pair, each attempt
        waiting `transfer_timeout_s` for its receiver, before the router places its request anew;
        a cuda_ipc sender stages what it sends in `transfer_staging_bytes` of its GPU's memory.
        `role_switching`: switch roles automatically (epd.cluster.router.auto_roles); None: by hand only.
        `shared_file_bytes`: memory for image files that the encoders of this host read in place
        (epd.cluster.shared_files; 0: every file goes as ZMQ frames)."""
        refuse_in_bootstrapping_child()
        specs = layout.instances(devices)
        multi_host = getattr(launcher, "multi_host", False)
        transfer = resolve_transfer(transfer, [s.device for s in specs], multi_host)
        kv_streaming = resolve_kv_streaming(kv_streaming, transfer)
        # Before anything starts: a bad profile is refused with nothing to stop.
        self._auto = None
        if role_switching is not None:
            from epd.cluster.router.auto_roles_sim import auto_policy  # the simulator: only when asked

            options = {"layout": layout.text, "transfer": transfer, "kv_streaming": kv_streaming}
            options["devices"] = [s.device for s in specs]  # where each instance encodes ahead or not
            self._auto = auto_policy(role_switching, engine, mm_cache_bytes=mm_cache_bytes, **options)
        self.launcher = launcher or LocalProcessLauncher(host)
        self.ctx = zmq.Context()
        self.inbox = self.ctx.socket(zmq.PULL)
        router_address = f"tcp://{host}:{self.inbox.bind_to_random_port(f'tcp://{host}')}"
        # Instances on this host and the router talk by Unix sockets here (epd.cluster.local_sockets).
        self.sockets = SocketDir()
        bind_router_locally(self.inbox, self.sockets.path)
        # Image files the encoders of this host read in place (epd.cluster.shared_files).
        self.shared_files = SharedFiles(shared_file_bytes) if shared_file_bytes > 0 else None
        threads = max(1, (os.cpu_count() or 1) // len(specs))
        configs = [
            InstanceConfig(
                spec,
                replace(engine, device=spec.device),
                router_address,
                transfer,
                self.launcher.host_for(spec),
                mm_cache_bytes=mm_cache_bytes,
                num_threads=threads,
                kv_streaming=kv_streaming,
                transfer_retries=transfer_retries,
                transfer_timeout_s=transfer_timeout_s,
                transfer_staging_bytes=transfer_staging_bytes,
                heartbeat_timeout_s=heartbeat_timeout_s,
                switchable_roles=switchable_roles,
                socket_dir=self.sockets.path,
                shared_files=self.shared_files and (self.shared_files.path, self.shared_files.token),
            )
            for spec in specs
        ]
        self.heartbeats = HeartbeatSender(heartbeat_interval(heartbeat_timeout_s))
        self.launched: dict[str, LaunchedInstance] = {}
        # Holds no reference to self: it runs when the cluster is collected or the interpreter exits.
        self._finalizer = weakref.finalize(self, _stop, self.heartbeats, self.launched, self.sockets)
        try:
            for cfg in configs:
                self.launched[cfg.name] = self.launcher.start(cfg)
            handles = self._wait_ready(specs)
        except BaseException:
            self.shutdown()
            raise
        addresses = {h.name: h.ready.control_address for h in handles}
        readers = [h.name for h in handles if h.ready.reads_shared_files]
        control = ZmqControlPlane(self.ctx, self.inbox, addresses, self.shared_files, readers)
        placement = placement_for(engine.scheduler.policies.prefill)  # slo: prefills placed by slack
        self.router = Router(
            handles, control, placement=placement, silence_timeout_s=silence_timeout_s, auto_policy=self._auto
        )
        prefill_seconds = prefill_seconds_of(engine.scheduler.slo_profile)
        if prefill_seconds is not None:  # encode deadlines leave room for the profile's prefill time
            self.router.core.prefill_seconds = prefill_seconds
        by_name = {cfg.name: cfg for cfg in configs}
        self.restarter = Restarter(
            self.launcher, by_name, self.launched, self.heartbeats, max_restarts=max_restarts
        )
        placed = ", ".join(f"{h.name}@{h.spec.device} (pid {h.ready.pid})" for h in handles)
        logger.info("layout %s ready: %s", layout.text, placed)

    def _wait_ready(self, specs: list[InstanceSpec]) -> list[InstanceHandle]:
        ready: dict[str, InstanceReady] = {}
        deadline = WALL_CLOCK.monotonic() + STARTUP_TIMEOUT_S
        while len(ready) < len(specs):
            if WALL_CLOCK.monotonic() > deadline:
                raise TimeoutError(
                    f"instances not ready after {STARTUP_TIMEOUT_S:.0f} s: "
                    f"{sorted({s.name for s in specs} - set(ready))}"
                )
            for name, launched in self.launched.items():
                if name not in ready and not launched.is_alive():
                    self._take_reports_of_the_dead(ready)
                    raise exited_during_startup(name, launched.exitcode)
            self._take_startup_message(ready, 0.2)
        return [InstanceHandle(s, ready[s.name], self.launched[s.name].is_alive) for s in specs]

    def _take_startup_message(self, ready: dict[str, InstanceReady], timeout_s: float) -> bool:
        """Wait up to timeout_s for one start-up message and take it (raising with the error of an
        instance that failed); False if none came."""
        if not self.inbox.poll(max(0, int(timeout_s * 1000))):
            return False
        msg = decode_for_router(self.inbox.recv())
        if isinstance(msg, InstanceFailed):
            raise RuntimeError(f"instance {msg.instance} failed to start:\n{msg.error}")
        if isinstance(msg, InstanceReady):
            ready[msg.instance] = msg
            # From now on it counts the router's silence; others may take minutes more to start.
            self.heartbeats.add(msg.instance, msg.control_address)
        return True

    def _take_reports_of_the_dead(self, ready: dict[str, InstanceReady]) -> None:
        """An instance died during start-up: the report it sent before exiting may still be queued
        behind other messages, and it says more than an exit code. Raises with the first one."""
        deadline = WALL_CLOCK.monotonic() + DEATH_REPORT_GRACE_S
        while self._take_startup_message(ready, deadline - WALL_CLOCK.monotonic()):
            pass

    # ---- the backend interface the offline API drives ------------------------------------------

    def prepare_images(self, prompt: ProcessedPrompt) -> ProcessedPrompt:
        return prompt  # the encoding instances decode the image files

    def add_request(
        self,
        request_id: str,
        prompt: ProcessedPrompt,
        params: SamplingParams,
        arrival_time: float | None = None,
    ) -> None:
        self.router.add_request(request_id, prompt, params, arrival_time)

    def step(self) -> list[RequestOutput]:
        outputs = self.router.poll()
        self.restarter.tick(self.router)
        return outputs

    def abort_request(self, request_id: str) -> None:
        self.router.abort(request_id)

    def has_unfinished_requests(self) -> bool:
        # A role switch under way counts: the caller keeps stepping (no idle waits) until it rejoins.
        return self.router.has_unfinished() or self.router.switches.busy()

    @property
    def max_model_len(self) -> int:
        return self.router.max_model_len

    def wake(self) -> None:
        self.router.wake()  # step() may be waiting up to 100 ms for instance messages

    def poll_idle(self) -> list[RequestOutput]:
        # Idle, the router must still read its inbox: instance stats keep /metrics current
        # and a dead instance is noticed (so /health turns 503) without any request.
        outputs = self.router.poll(timeout_ms=0)
        self.restarter.tick(self.router)
        return outputs

    def instance_stats(self) -> dict[str, dict[str, float]]:
        """What each instance reported, and what the router and the cluster count about it when it
        died (requests redone by recovery, restarts)."""
        stats = {name: dict(reported) for name, reported in self.router.instance_stats.items()}
        for name, counts in self.router.core.recoveries.items():
            for action, count in counts.items():
                stats.setdefault(name, {})[f"requests_{action}_total"] = float(count)
        for name, count in self.restarter.restarts().items():
            stats.setdefault(name, {})["restarts_total"] = float(count)
        return stats

    def instances_up(self) -> dict[str, bool]:
        return {name: h.alive for name, h in self.router.instances.items()}

    # ---- role switching (epd.cluster.router.role_switch; epd.entrypoints.backend.RoleControl) ----

    def instances(self) -> list[dict]:
        return self.router.switches.instances()

    def set_roles(self, instance: str, roles: str, on_done: Callable[[dict], None]) -> None:
        self.router.set_roles(instance, roles, on_done)

    def role_switches(self) -> list[dict]:
        return self.router.switches.records()

    def missing_roles(self) -> list[str]:
        handles = self.router.instances.values()
        needed = {role for h in handles for role in h.started_as.roles}
        held = {role for h in handles if h.alive for role in h.spec.roles}
        return [role.value for role in ROLE_ORDER if role in needed - held]

    def shutdown(self) -> None:
        """Stop every instance and the heartbeats. Idempotent."""
        if not self._finalizer.alive:
            return
        router = getattr(self, "router", None)  # None when start-up failed: nobody was told to stop
        if router is not None:
            router.broadcast(Shutdown())
            deadline = WALL_CLOCK.monotonic() + SHUTDOWN_GRACE_S
            for launched in self.launched.values():
                launched.join(max(0.0, deadline - WALL_CLOCK.monotonic()))
        self._finalizer()  # stops the heartbeats; kills whatever did not stop in time
        if router is not None:
            router.close()
            router.control.close()
        self.ctx.destroy(linger=0)
        if self.shared_files is not None:
            self.shared_files.close()


def _stop(heartbeats: HeartbeatSender, launched: dict[str, LaunchedInstance], sockets: SocketDir) -> None:
    heartbeats.stop()
    kill_all(launched.values())
    sockets.remove()
