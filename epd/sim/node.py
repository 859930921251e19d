"""One instance in the simulation: the shell that gives a real `InstanceCore` its inputs and turns.

Each instance keeps its own virtual clock, since instances run in parallel: a turn starts at the
harness's time and the compute it runs moves the instance's clock on (epd.engine.scripted_runner),
so what the turn sends is stamped with the time it was sent, and the instance is busy until its
clock says. Control messages that arrive meanwhile wait in its inbox, as they would in its socket.

A turn is what the production loop does once (epd.cluster.instance.shell: `run_once`): control
messages, then arrived transfers, then one step. A turn that took nothing in, sent nothing and took
no time leaves the instance asleep until something arrives: its work is waiting on others (an encoder
whose cache is full of unreleased embeddings), and turning it again would change nothing.
"""

from __future__ import annotations

from collections import deque

import msgspec

from epd.clock import VirtualClock
from epd.cluster.instance import InstanceCore
from epd.transfer.memory import MemoryConnector

Stamped = tuple[float, msgspec.Struct]  # (when it was sent, the message)


class StampedOutbox:
    """The core's outbox: each message with its instance's time when it was sent."""

    def __init__(self, clock: VirtualClock) -> None:
        self.clock = clock
        self.messages: list[Stamped] = []

    def send(self, message: msgspec.Struct) -> None:
        self.messages.append((self.clock.now(), message))

    def take(self) -> list[Stamped]:
        taken, self.messages = self.messages, []
        return taken


class SimInstance:
    def __init__(
        self, core: InstanceCore, clock: VirtualClock, connector: MemoryConnector, outbox: StampedOutbox
    ) -> None:
        self.core, self.clock, self.connector, self.outbox = core, clock, connector, outbox
        self.name = core.instance_id
        self.inbox: deque[msgspec.Struct] = deque()
        self.asleep = False  # its last turn changed nothing: wait for an input
        self.num_turns = 0
        self.busy_s = 0.0  # virtual time spent computing

    def deliver(self, message: msgspec.Struct) -> None:
        self.inbox.append(message)
        self.asleep = False

    def transfer_arrived(self) -> None:
        self.asleep = False

    def is_free(self, now: float) -> bool:
        return self.clock.now() <= now

    def wants_turn(self, now: float) -> bool:
        """Free at `now`, with something to take in or work it can do."""
        if not self.is_free(now):
            return False
        return bool(self.inbox) or self.connector.has_received() or (self.core.has_work() and not self.asleep)

    def turn(self, now: float) -> list[Stamped]:
        """One turn of the production loop, starting at `now`; what it sent the router, stamped."""
        self.clock.advance_to(now)
        took_in = bool(self.inbox) or self.connector.has_received()
        sends_before = self.connector.num_sends
        while self.inbox:
            self.core.on_message(self.inbox.popleft())
        self.core.receive_transfers()
        self.core.step()
        sent = self.outbox.take()
        self.busy_s += self.clock.now() - now
        self.num_turns += 1
        changed = took_in or sent or self.connector.num_sends != sends_before or self.clock.now() > now
        self.asleep = not changed
        return sent
