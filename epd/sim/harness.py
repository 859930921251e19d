"""The event loop that drives a `SimCluster` on virtual time: requests in, outputs and a log out.

    arrival ---> router.add_request --(control latency)--> instance inbox
    instance turn (when free): inbox, transfers, one step; compute moves its clock on
        messages, stamped when sent --(control latency)--> router.handle --> instance inboxes
        transfers --(memory network: latency + bytes / bandwidth)--> receiver's connector

Per iteration: every instance that is free and has something to do takes one turn, in layout
order; then time jumps to the next thing due (a queued delivery, an arrival, a transfer landing, an
instance finishing its turn). Nothing depends on wall time, threads, ids or hashing order, so the same
requests give the same log. The harness only delivers what the cores send; which messages those are
is the cores' business.
"""

from __future__ import annotations

from dataclasses import dataclass

import msgspec
import torch

from epd.cluster.messages import encode
from epd.cluster.router import Outgoing
from epd.outputs import RequestOutput
from epd.sim.cluster import ROUTER, SimCluster
from epd.sim.events import EventLog, EventQueue, LogEntry
from epd.sim.node import SimInstance, Stamped
from epd.sim.workload import SimRequest


@dataclass
class SimResult:
    outputs: dict[str, RequestOutput]  # finished requests, by id
    log: EventLog
    end_time: float  # virtual seconds when the last thing happened
    leftovers: list[str]  # what anything still held at the end ([]: all clean)
    busy_s: dict[str, float]  # virtual compute time per instance
    turns: dict[str, int]


class Harness:
    def __init__(self, cluster: SimCluster) -> None:
        self.cluster, self.router, self.clock = cluster, cluster.router, cluster.clock
        self.latency = cluster.spec.control_latency_s
        self.queue = EventQueue()
        self.log = EventLog()
        self.outputs: dict[str, RequestOutput] = {}

    def run(self, requests: list[SimRequest]) -> SimResult:
        """Serve `requests` (each at its arrival time) until nothing is left to do."""
        threads = torch.get_num_threads()
        # Every tensor here is tiny: intra-op threads only add spin-waits, which made a run 4x
        # slower on a busy 2-core machine. One thread, as the loop itself is.
        torch.set_num_threads(1)
        try:
            return self._run(requests)
        finally:
            torch.set_num_threads(threads)

    def _run(self, requests: list[SimRequest]) -> SimResult:
        for request in requests:
            self.queue.push(request.arrival_time, self._arrive, request)
        while True:
            self._turn_free_instances()
            if any(node.wants_turn(self.clock.now()) for node in self.cluster.nodes):
                continue  # a turn that cost no time left more to do now
            due = self._next_time()
            if due is None:
                break
            self.clock.advance_to(due)
            self.queue.run_due(due)
            self._land_transfers(due)
        return self._result()

    def _next_time(self) -> float | None:
        times = [t for t in (self.queue.next_time(), self.cluster.network.next_arrival()) if t is not None]
        return min(times, default=None)

    # ---- the router's side --------------------------------------------------------------------

    def _arrive(self, request: SimRequest) -> None:
        self.log.record(LogEntry(self.clock.now(), "arrival", "client", ROUTER, request.request_id))
        rid, prompt, params = request.request_id, request.prompt, request.params
        self._send(self.router.add_request(rid, prompt, params, request.arrival_time))

    def _to_router(self, source: str, message: msgspec.Struct) -> None:
        self._record_message(source, ROUTER, message)
        self._send(self.router.handle(message))

    def _send(self, outgoing: list[Outgoing]) -> None:
        for instance, message in outgoing:
            self.queue.push(self.clock.now() + self.latency, self._to_instance, instance, message)
        for output in self.router.take_outputs():
            if output.finished:
                self.outputs[output.request_id] = output

    # ---- the instances' side ------------------------------------------------------------------

    def _to_instance(self, instance: str, message: msgspec.Struct) -> None:
        self._record_message(ROUTER, instance, message)
        self.cluster.by_name[instance].deliver(message)

    def _land_transfers(self, now: float) -> None:
        by_address = self.cluster.by_address
        for landed in self.cluster.network.deliver_until(now):
            source, dest = by_address[landed.source], by_address[landed.dest]
            entry = LogEntry(landed.time, "transfer", source.name, dest.name, landed.key)
            self.log.record(entry, landed.nbytes.to_bytes(8, "little"))
            dest.transfer_arrived()

    def _turn_free_instances(self) -> None:
        now = self.clock.now()
        for node in self.cluster.nodes:
            if node.wants_turn(now):
                self._sent_by(node, node.turn(now))
                if not node.is_free(now):
                    self.queue.push(node.clock.now(), _free)  # be back when its turn ends

    def _sent_by(self, node: SimInstance, sent: list[Stamped]) -> None:
        for stamp, message in sent:
            self.queue.push(stamp + self.latency, self._to_router, node.name, message)

    # ---- the record ---------------------------------------------------------------------------

    def _record_message(self, source: str, dest: str, message: msgspec.Struct) -> None:
        entry = LogEntry(self.clock.now(), "message", source, dest, type(message).__name__)
        self.log.record(entry, encode(message))

    def _result(self) -> SimResult:
        nodes = self.cluster.nodes
        return SimResult(
            self.outputs,
            self.log,
            self.clock.now(),
            self.cluster.leftovers(),
            {n.name: n.busy_s for n in nodes},
            {n.name: n.num_turns for n in nodes},
        )


def _free() -> None:
    """Nothing to do: the event only brings the loop to the time an instance is free again."""


def simulate(cluster: SimCluster, requests: list[SimRequest]) -> SimResult:
    return Harness(cluster).run(requests)
