"""The event loop that drives a `SimCluster` on virtual time: requests in, outputs and a log out.

    arrival ---> router.add_request --(control latency)--> instance inbox
        (an arrival waits while `max_in_flight` requests are in flight)
    instance turn (when free): inbox, transfers, one step; compute moves its clock on
        messages, stamped when sent --(control latency)--> router.handle --> instance inboxes
        transfers --(memory network: latency + bytes / bandwidth)--> receiver's connector

Per iteration: every instance that is free and has something to do takes one turn, in layout
order (only those that got an input or ended a turn are asked); then time jumps to the next thing
due (a queued delivery, an arrival, a transfer landing, an instance finishing its turn). Nothing
depends on wall time, threads, ids or hashing order, so the same requests give the same log. The
harness only delivers what the cores send; which messages those are is the cores' business.

It also watches what a client would see: when each request was sent (`sent_at`: its arrival, or
later when `max_in_flight` held it back, as `epd bench --max-concurrency` does) and when the router
had each new batch of its tokens (`token_times`), for the benchmark's TTFT, ITL and E2E.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import msgspec
import torch

from epd.cluster.messages import SetRolesReply, encode
from epd.cluster.router import Outgoing
from epd.outputs import RequestOutput
from epd.sim.cluster import ROUTER, SimCluster
from epd.sim.events import EventLog, EventQueue, LogEntry
from epd.sim.host_costs import front_end_delay, patches_delay
from epd.sim.node import SimInstance, Stamped
from epd.sim.workload import SimRequest

SWITCH_TICK_S = 0.1  # virtual seconds between the automatic role-switching policy's looks


@dataclass
class SimResult:
    outputs: dict[str, RequestOutput]  # finished requests, by id
    log: EventLog
    end_time: float  # virtual seconds when the last thing happened
    leftovers: list[str]  # what anything still held at the end ([]: all clean)
    busy_s: dict[str, float]  # virtual compute time per instance
    turns: dict[str, int]
    sent_at: dict[str, float] = field(default_factory=dict)  # when each request was sent (front end starts)
    # Per request, (virtual time, tokens so far) each time the router had more of its tokens.
    token_times: dict[str, list[tuple[float, int]]] = field(default_factory=dict)
    switches: list[dict] = field(default_factory=list)  # role switches finished (RoleSwitch.to_dict)


class Harness:
    def __init__(self, cluster: SimCluster, max_in_flight: int | None = None) -> None:
        self.cluster, self.router, self.clock = cluster, cluster.router, cluster.clock
        self.latency = cluster.spec.control_latency_s
        self.host_costs = cluster.spec.host_costs
        self.queue = EventQueue()
        self.log = EventLog()
        self.outputs: dict[str, RequestOutput] = {}
        self.max_in_flight = max_in_flight
        self.held: deque[SimRequest] = deque()  # arrived while max_in_flight were in flight
        self.in_flight = 0
        self.sent_at: dict[str, float] = {}
        self.token_times: dict[str, list[tuple[float, int]]] = {}
        # Instances that may want a turn: those that got an input or finished a turn since they
        # were last asked. Any other is busy, asleep or idle, and asking it would change nothing.
        self.position = {node.name: i for i, node in enumerate(cluster.nodes)}
        self.to_ask: set[str] = set(self.position)
        self.switches, self.auto = cluster.switches, cluster.auto
        self.to_arrive = 0  # requests not yet at the router (the policy looks until none is)

    def run(self, requests: list[SimRequest]) -> SimResult:
        """Serve `requests` (each at its arrival time, at most `max_in_flight` at once) until nothing
        is left to do."""
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
        self.to_arrive = len(requests)
        if self.auto is not None:
            self.queue.push(0.0, self._look)
        while True:
            if self._turn_free_instances():
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
        self.held.append(request)
        self._send_held()

    def _send_held(self) -> None:
        """Send what arrived, as far as `max_in_flight` lets (a finished request makes room)."""
        while self.held and (self.max_in_flight is None or self.in_flight < self.max_in_flight):
            request = self.held.popleft()
            now, rid = self.clock.now(), request.request_id
            self.log.record(LogEntry(now, "arrival", "client", ROUTER, rid))
            self.sent_at[rid] = now
            self.in_flight += 1
            delay = front_end_delay(self.host_costs, request.prompt)  # the API process's work
            self.queue.push(now + delay, self._admit, request)

    def _admit(self, request: SimRequest) -> None:
        now = self.clock.now()
        self.to_arrive -= 1
        self._send(self.router.add_request(request.request_id, request.prompt, request.params, now))
        if self.auto is not None:
            self.auto.note_request(request.prompt, request.params)

    def _to_router(self, source: str, message: msgspec.Struct) -> None:
        self._record_message(source, ROUTER, message)
        self._send(self.router.handle(message))
        if isinstance(message, SetRolesReply):
            self.switches.on_reply(message)
        self._send(self.switches.tick())  # a drain may have ended: [] when nothing switches
        if self.held:
            self._send_held()

    def _send(self, outgoing: list[Outgoing]) -> None:
        for instance, message in outgoing:
            # Images are usable patches only once their files are decoded there.
            arrives = self.clock.now() + self.latency + patches_delay(self.host_costs, message)
            self.queue.push(arrives, self._to_instance, instance, message)
        for output in self.router.take_outputs():
            self._note_tokens(output)
            if output.finished:
                self.outputs[output.request_id] = output
                self.in_flight -= 1

    def _note_tokens(self, output: RequestOutput) -> None:
        count = len(output.outputs[0].token_ids) if output.outputs else 0
        times = self.token_times.setdefault(output.request_id, [])
        if count > (times[-1][1] if times else 0):
            times.append((self.clock.now(), count))

    def _look(self) -> None:
        """The automatic policy's periodic look (the production router's poll), while anything is
        left to serve."""
        assert self.auto is not None
        self._send(self.switches.tick())
        self._send(self.auto.tick())
        if self.to_arrive or self.router.has_unfinished() or self.switches.busy():
            self.queue.push(self.clock.now() + SWITCH_TICK_S, self._look)

    # ---- the instances' side ------------------------------------------------------------------

    def _to_instance(self, instance: str, message: msgspec.Struct) -> None:
        self._record_message(ROUTER, instance, message)
        self.cluster.by_name[instance].deliver(message)
        self.to_ask.add(instance)

    def _land_transfers(self, now: float) -> None:
        by_address = self.cluster.by_address
        for landed in self.cluster.network.deliver_until(now):
            source, dest = by_address[landed.source], by_address[landed.dest]
            entry = LogEntry(landed.time, "transfer", source.name, dest.name, landed.key)
            self.log.record(entry, landed.nbytes.to_bytes(8, "little"))
            dest.transfer_arrived()
            self.to_ask.add(dest.name)

    def _turn_free_instances(self) -> bool:
        """A turn for each instance that is free and has something to do, in layout order; whether
        any of them has more to do at once (a turn that took no time)."""
        now, by_name = self.clock.now(), self.cluster.by_name
        asked, self.to_ask = sorted(self.to_ask, key=self.position.__getitem__), set()
        for node in (by_name[name] for name in asked):
            if not node.wants_turn(now):
                continue
            self._sent_by(node, node.turn(now))
            if not node.is_free(now):
                self.queue.push(node.clock.now(), self._free, node)  # be back when its turn ends
            elif node.wants_turn(now):
                self.to_ask.add(node.name)
        return bool(self.to_ask)

    def _free(self, node: SimInstance) -> None:
        """Its turn is over: ask it again."""
        self.to_ask.add(node.name)

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
            self.sent_at,
            self.token_times,
            self.switches.records(),
        )


def simulate(cluster: SimCluster, requests: list[SimRequest], max_in_flight: int | None = None) -> SimResult:
    return Harness(cluster, max_in_flight).run(requests)
