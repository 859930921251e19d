"""The production shell of an instance: a process that gives its core ZMQ sockets and a connector.

The loop blocks on a poller over the control socket and the connector, so an idle instance uses
no CPU; it exits when told to (`Shutdown`), or when the router has gone silent. Its launcher need
not be its parent (epd.cluster.launcher), so liveness is by heartbeat (epd.cluster.heartbeat):

| state    | event                                                       | next     | last_heard |
|----------|-------------------------------------------------------------|----------|------------|
| building | sent InstanceReady (the router starts heartbeating then)    | serving  | now        |
| serving  | any control message: `Heartbeat` (consumed here, never      | serving  | now        |
|          | reaching the core) or work                                  |          |            |
| serving  | inbox drained, now - last_heard > cfg.heartbeat_timeout_s   | exits    |            |
| serving  | `Shutdown`                                                  | exits    |            |

The inbox is drained before judging: beats that queued during a long step count, so a busy
instance is never taken for an orphan; only a router that stopped sending is.

A tensor-parallel instance (`cfg.spec.degree` > 1) is this process as rank 0 plus workers its
launcher started: `instance_main` joins their group and gives the core their compute
(epd.parallel.parts.instance_parts); nothing else here knows of them. They end when this process
ends (epd.parallel.lifeline).
"""

from __future__ import annotations

import logging
import os
import traceback

import msgspec
import torch
import zmq

from epd.clock import WALL_CLOCK, Clock
from epd.cluster.instance.config import InstanceConfig
from epd.cluster.instance.core import MODEL_COMPUTE, Compute, InstanceCore
from epd.cluster.layout import Role
from epd.cluster.local_sockets import bind_inbox, reach_router
from epd.cluster.messages import Heartbeat, InstanceFailed, decode_for_instance, encode
from epd.cluster.shared_files import SharedFileReader
from epd.engine.llm_engine import LLMEngine
from epd.parallel.encoder import split_vision_tower
from epd.parallel.group import TensorParallelGroup, backend_for
from epd.parallel.parts import instance_parts
from epd.transfer.base import Connector, create_backend
from epd.transfer.retry import RetryingConnector

logger = logging.getLogger(__name__)

IDLE_POLL_MS = 200  # only bounds how late a silent router is noticed; work wakes the poller


def instance_main(cfg: InstanceConfig) -> None:
    """Process entry point: build, report ready, serve until shutdown."""
    # EPD_LOG_LEVEL=debug: an instance's own detail (the encoder's time per batch), inherited from the server.
    level = os.environ.get("EPD_LOG_LEVEL", "info").upper()
    logging.basicConfig(level=level, format=f"%(asctime)s {cfg.name} %(levelname)s %(message)s")
    torch.set_num_threads(cfg.num_threads)
    if torch.device(cfg.engine.device).type == "cuda":
        # Triton launches on the current device, whatever its pointers say: make it this instance's.
        torch.cuda.set_device(torch.device(cfg.engine.device))
    ctx = zmq.Context()
    outbox = ctx.socket(zmq.PUSH)
    outbox.connect(reach_router(cfg.socket_dir, cfg.router_address))
    try:
        instance = Instance(cfg, ctx, outbox, compute=compute_of(cfg))
    except Exception:
        outbox.send(encode(InstanceFailed(cfg.name, traceback.format_exc())))
        outbox.close(linger=2000)
        # Returns once the report is out (the parent reads it after seeing this exit); whatever the
        # failed construction left open is closed at once.
        ctx.destroy(linger=0)
        raise SystemExit(1) from None
    try:
        instance.serve()
    finally:
        instance.close()
        ctx.destroy(linger=0)


def compute_of(cfg: InstanceConfig) -> Compute:
    """What the instance computes with: its checkpoint's model, at degree > 1 over its workers'
    group, which this process joins as rank 0 (returns once every worker has joined)."""
    degree = cfg.spec.degree
    if degree == 1:
        return MODEL_COMPUTE
    if cfg.tp_init_method is None:
        raise ValueError(
            f"{cfg.name} is tensor-parallel (tp{degree}) but no launcher started its workers: "
            "only the local launcher does (--launcher local)"
        )
    if cfg.switchable_roles:
        raise ValueError(
            f"{cfg.name}: switchable roles are not supported with tensor parallelism (tp{degree})"
        )
    group = TensorParallelGroup.join(cfg.tp_init_method, 0, degree, backend_for(cfg.spec.device))
    if not (cfg.has(Role.PREFILL) or cfg.has(Role.DECODE)):  # encoder-only: the tower split
        return Compute(vision=split_vision_tower(group))
    return Compute(parts=instance_parts(group, sends_by_rank=cfg.hands_off_kv))


def make_connector(cfg: InstanceConfig, name: str) -> Connector:
    """The backend `name` under `cfg.transfer_retries` retries (epd.transfer.retry), also under none:
    a failed send then still reads "gave up after 1 attempt", so the router places its request anew
    rather than failing it. Each attempt waits `cfg.transfer_timeout_s` for its receiver (the local
    backend moves nothing between instances: it takes no timeout)."""
    options: dict = {} if name == "local" else {"send_timeout_s": cfg.transfer_timeout_s}
    if name == "cuda_ipc":
        options["staging_bytes"] = cfg.transfer_staging_bytes
    backend = create_backend(name, device=cfg.engine.device, host=cfg.host, **options)
    return RetryingConnector(backend, cfg.transfer_retries)


class SocketOutbox:
    """The core's outbox in a process: a PUSH socket to the router."""

    def __init__(self, socket: zmq.Socket) -> None:
        self.socket = socket

    def send(self, message: msgspec.Struct) -> None:
        self.socket.send(encode(message))


class Instance:
    """An `InstanceCore` behind a control inbox (PULL, bound here) and an outbox to the router."""

    def __init__(
        self,
        cfg: InstanceConfig,
        ctx: zmq.Context,
        outbox: zmq.Socket,
        clock: Clock = WALL_CLOCK,
        compute: Compute = MODEL_COMPUTE,
    ) -> None:
        self.cfg, self.name, self.outbox, self.clock = cfg, cfg.name, outbox, clock
        self.last_heard = clock.monotonic()  # from the router: anything on the control socket
        self.inbox = ctx.socket(zmq.PULL)
        self.control_address = bind_inbox(self.inbox, cfg.host, cfg.socket_dir, cfg.name)
        # The API process's image files, where this process can map them (same host): the router
        # then names a file's place there instead of sending it (epd.cluster.shared_files).
        self.shared_files = SharedFileReader.open(cfg.shared_files)
        # An instance that does everything moves nothing between instances.
        all_roles = all(cfg.has(role) for role in (Role.ENCODE, Role.PREFILL, Role.DECODE))
        connector = make_connector(cfg, "local" if all_roles else cfg.transfer)
        self.core = InstanceCore(cfg, connector, SocketOutbox(outbox), clock, compute)

    @property
    def connector(self) -> Connector:
        return self.core.connector

    @property
    def engine(self) -> LLMEngine | None:
        return self.core.engine

    def stats(self) -> dict[str, float]:
        return self.core.stats()

    def serve(self) -> None:
        ready = self.core.ready_message(self.control_address)
        ready.reads_shared_files = self.shared_files is not None
        self.core.outbox.send(ready)
        self.last_heard = self.clock.monotonic()
        poller = zmq.Poller()
        poller.register(self.inbox, zmq.POLLIN)
        for handle in [*self.connector.pollables(), *self.core.pollables()]:
            poller.register(handle, zmq.POLLIN)
        while not self.core.stopping:
            poller.poll(0 if self.core.has_work() else IDLE_POLL_MS)
            self.run_once()
            if self.router_silent():
                logger.warning(
                    "nothing from the router for %.1f s (heartbeat timeout): exiting",
                    self.clock.monotonic() - self.last_heard,
                )
                return

    def router_silent(self) -> bool:
        """Whether the router sent nothing for longer than the heartbeat timeout. Takes what is in
        the inbox first: what queued while a step ran counts."""
        self._receive_control()
        return self.clock.monotonic() - self.last_heard > self.cfg.heartbeat_timeout_s

    def run_once(self) -> None:
        """One turn of the loop, without waiting: what arrived (control first, then transfers), one
        step, stats when due. Tests drive an instance with it, in an order they choose."""
        self._receive_control()
        self.core.receive_transfers()
        self.core.step()

    def _receive_control(self) -> None:
        while True:
            try:
                data = self.inbox.recv_multipart(zmq.NOBLOCK)  # files come as frames of their own
            except zmq.Again:
                return
            self.last_heard = self.clock.monotonic()
            message = decode_for_instance(data, self.shared_files)
            if not isinstance(message, Heartbeat):  # it said all it had to by arriving
                self.core.on_message(message)

    def close(self) -> None:
        self.core.close()
        self.connector.close()
        self.inbox.close(linger=0)
        self.outbox.close(linger=1000)
