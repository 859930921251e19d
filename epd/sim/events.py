"""The simulation's timeline: a queue of things due at virtual times, and the log of what happened.

Ties are broken by insertion order, never by object identity or hashing, so a run is the same in
every process. The log keeps a short line per entry and folds each entry's full bytes (the encoded
message) into one digest: two runs are the same run iff their digests match.
"""

from __future__ import annotations

import hashlib
import heapq
import itertools
from collections.abc import Callable
from typing import Any

import msgspec


class EventQueue:
    def __init__(self) -> None:
        # (time, seq, action, args): plain tuples compare in C, and `seq` is unique, so the
        # actions themselves are never compared.
        self._heap: list[tuple[float, int, Callable[..., None], tuple[Any, ...]]] = []
        self._seq = itertools.count()

    def push(self, time: float, action: Callable[..., None], *args: Any) -> None:
        heapq.heappush(self._heap, (time, next(self._seq), action, args))

    def next_time(self) -> float | None:
        return self._heap[0][0] if self._heap else None

    def run_due(self, now: float) -> None:
        """Run every action due by `now`, earliest first (and those they push, if also due)."""
        while self._heap and self._heap[0][0] <= now:
            _, _, action, args = heapq.heappop(self._heap)
            action(*args)

    def __len__(self) -> int:
        return len(self._heap)


class LogEntry(msgspec.Struct, frozen=True):
    time: float
    kind: str  # "arrival", "message", "transfer"
    source: str  # "client", "router", an instance name
    dest: str
    what: str  # the message type, the transfer key, the request id


class EventLog:
    def __init__(self) -> None:
        self.entries: list[LogEntry] = []
        self._hash = hashlib.sha256()
        self._encode = msgspec.msgpack.Encoder().encode

    def record(self, entry: LogEntry, body: bytes = b"") -> None:
        self.entries.append(entry)
        self._hash.update(self._encode(entry))
        self._hash.update(len(body).to_bytes(8, "little"))
        self._hash.update(body)

    def digest(self) -> str:
        return self._hash.hexdigest()

    def __len__(self) -> int:
        return len(self.entries)
