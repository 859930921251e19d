"""What every stage manager of an instance offers, and where managers put their messages.

A stage manager (encode, prefill, decode) is a state machine without sockets: the core hands it
control messages (`on_message`), arrived transfers (`on_transfer`) and turns (`step`); it answers
through an `Outbox` and moves tensors through the connector it was given.
"""

from __future__ import annotations

from typing import Protocol

import msgspec

from epd.transfer.base import Received


class Outbox(Protocol):
    """Where an instance's messages to the router go: a ZMQ socket in production, a list in tests."""

    def send(self, message: msgspec.Struct) -> None: ...


class ListOutbox:
    """Keeps the messages, in order, for whoever drives the core by hand (tests, the simulator)."""

    def __init__(self) -> None:
        self.messages: list[msgspec.Struct] = []

    def send(self, message: msgspec.Struct) -> None:
        self.messages.append(message)

    def take(self) -> list[msgspec.Struct]:
        """The messages sent since the last call."""
        taken, self.messages = self.messages, []
        return taken


class StageManager:
    """The contract of a stage manager; the defaults are "nothing to do"."""

    def on_message(self, msg: object) -> None:
        """A control message the core routed here (it routes only the kinds the stage handles)."""

    def on_transfer(self, received: Received) -> None:
        """A transfer (embeddings or KV) addressed to this stage."""

    def step(self) -> None:
        """One turn of work that needs no input (encoding a batch); the engine steps in the core."""

    def abort(self, request_id: str) -> None:
        """Drop whatever the stage holds for the request (idempotent)."""

    def has_work(self) -> bool:
        """Whether the next turn would do something: the shell then polls without waiting."""
        return False

    def busy_requests(self) -> int:
        """Requests the stage holds state for; a stage may be removed only at 0."""
        return 0

    def stats(self) -> dict[str, float]:
        return {}
