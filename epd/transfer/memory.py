"""In-memory connectors on a virtual clock: transfers between instances of one process, no threads.

Every connector comes from one `MemoryNetwork`, which holds what is in flight. A send leaves at its
sender's clock time and arrives `latency_s + nbytes / bandwidth` later; one pair's transfers share a
link, one after another (so each pair stays FIFO and a big transfer delays the ones behind it).
Nothing moves by itself: the driver (epd.sim) asks `next_arrival()` and calls `deliver_until(t)`,
which puts arrivals in their receivers' queues and reports each completed send to its sender.

The defaults (no latency, unlimited bandwidth) deliver a send at the time it was made. Tensors are
handed over as they are (moved with `.to(device)`, a no-op on one device), as `local` does.

A send is charged the bytes of its tensors, or what `wire_bytes` says it would be: the simulator's
stand-in tensors are narrower than a real model's (one number per KV slot, not every layer and
head), so it charges the bytes the real transfer would move instead.
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections import deque
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from epd.clock import Clock
from epd.transfer.base import Connector, ConnectorClosedError, Received, SendResult, check_send_args
from epd.transfer.serialization import check_meta

# (key, tensors) -> the bytes a send puts on the wire
WireBytes = Callable[[str, dict[str, torch.Tensor]], int]


def tensor_bytes(key: str, tensors: dict[str, torch.Tensor]) -> int:
    """The default `WireBytes`: what the tensors hold."""
    return sum(t.numel() * t.element_size() for t in tensors.values())


class _InFlight(NamedTuple):
    arrival: float
    seq: int  # ties arrive in send order; unique, so nothing after it is ever compared
    source: MemoryConnector
    dest: str
    received: Received


class Delivered(NamedTuple):
    """A transfer that landed: what the driver logs, and whom it wakes."""

    time: float
    source: str
    dest: str
    key: str
    nbytes: int


class MemoryNetwork:
    """The links between memory connectors: what is in flight, and when each transfer lands."""

    def __init__(
        self,
        latency_s: float = 0.0,
        bandwidth_bytes_per_s: float = math.inf,
        wire_bytes: WireBytes = tensor_bytes,
    ) -> None:
        if latency_s < 0 or bandwidth_bytes_per_s <= 0:
            raise ValueError("latency must be >= 0 and bandwidth > 0")
        self.latency_s, self.bandwidth = latency_s, bandwidth_bytes_per_s
        self.wire_bytes = wire_bytes
        self.connectors: dict[str, MemoryConnector] = {}
        self._in_flight: list[_InFlight] = []
        self._link_free: dict[tuple[str, str], float] = {}  # (source, dest) -> when its link is free
        self._seq = itertools.count()

    def connector(self, name: str, clock: Clock, device: str | torch.device = "cpu") -> MemoryConnector:
        """A connector at address `memory://<name>`, timing its sends by `clock` (its instance's)."""
        address = f"memory://{name}"
        if address in self.connectors:
            raise ValueError(f"a connector named {name!r} exists already")
        self.connectors[address] = MemoryConnector(self, address, clock, device)
        return self.connectors[address]

    def next_arrival(self) -> float | None:
        """When the earliest transfer in flight lands; None if nothing is in flight."""
        return self._in_flight[0].arrival if self._in_flight else None

    def deliver_until(self, now: float) -> list[Delivered]:
        """Land every transfer due by `now`, in arrival order; those a receiver got."""
        landed: list[Delivered] = []
        while self._in_flight and self._in_flight[0].arrival <= now:
            delivered = self._land(heapq.heappop(self._in_flight))
            if delivered is not None:
                landed.append(delivered)
        return landed

    def in_flight(self) -> int:
        return len(self._in_flight)

    def carry(self, source: MemoryConnector, dest: str, received: Received) -> None:
        """Put `received` on the wire from `source` to `dest` (ValueError for an unknown address)."""
        if dest not in self.connectors:
            raise ValueError(f"no memory connector at {dest!r}")
        link = (source.address, dest)
        departs = max(received.sent_at, self._link_free.get(link, -math.inf))
        on_wire = received.nbytes / self.bandwidth
        self._link_free[link] = departs + on_wire
        arrival = departs + on_wire + self.latency_s
        heapq.heappush(self._in_flight, _InFlight(arrival, next(self._seq), source, dest, received))

    def _land(self, transfer: _InFlight) -> Delivered | None:
        """Hand the transfer to its receiver and report it to its sender; None if nobody got it."""
        source, dest, received = transfer.source, transfer.dest, transfer.received
        if source.closed:
            return None  # abandoned, unreported (the Connector contract, item 7)
        seconds = transfer.arrival - received.sent_at
        if self.connectors[dest].closed:
            source.report(SendResult(received.key, dest, False, received.nbytes, seconds, "receiver closed"))
            return None
        self.connectors[dest].arrive(received)
        source.report(SendResult(received.key, dest, True, received.nbytes, seconds))
        return Delivered(transfer.arrival, source.address, dest, received.key, received.nbytes)


class MemoryConnector(Connector):
    """One instance's end of a `MemoryNetwork`; build it with `MemoryNetwork.connector`."""

    name = "memory"

    def __init__(
        self, network: MemoryNetwork, address: str, clock: Clock, device: str | torch.device
    ) -> None:
        self.network, self._address, self.clock = network, address, clock
        self.device = torch.device(device)
        self._received: deque[Received] = deque()
        self._sent: deque[SendResult] = deque()
        self.closed = False
        self.num_sends = 0  # lets a driver see whether a turn sent anything

    @property
    def address(self) -> str:
        return self._address

    def send(
        self, dest: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        check_send_args(key, tensors, meta)
        meta = check_meta(meta)
        if self.closed:
            raise ConnectorClosedError(f"send({key!r}) on a closed memory connector")
        nbytes = self.network.wire_bytes(key, tensors)
        self.network.carry(self, dest, Received(key, dict(tensors), meta, nbytes, self.clock.now()))
        self.num_sends += 1

    def poll_sent(self) -> list[SendResult]:
        return _drain(self._sent)

    def poll_received(self) -> list[Received]:
        return _drain(self._received)

    def has_received(self) -> bool:
        return bool(self._received)

    def pollables(self) -> list[Any]:
        return []

    def close(self) -> None:
        self.closed = True
        self._received.clear()
        self._sent.clear()

    # ---- the network's side -------------------------------------------------------------------

    def arrive(self, received: Received) -> None:
        moved = {name: t.to(self.device) for name, t in received.tensors.items()}
        self._received.append(Received(received.key, moved, received.meta, received.nbytes, received.sent_at))

    def report(self, result: SendResult) -> None:
        self._sent.append(result)


def _drain(items: deque) -> list:
    out = list(items)
    items.clear()
    return out
