"""The in-process connector: E and P roles in one instance, so there is nothing to move.

It exists so the instance loop has no `if transfer_enabled:` branches: the same send / poll calls run,
and the consumer gets the producer's very tensor objects (moved with `.to(device)`, a no-op when the
device already matches, which is the case for one instance).
"""

from __future__ import annotations

import itertools
import os
import time
from collections import deque
from typing import Any

import torch

from epd.transfer.base import (
    Connector,
    ConnectorClosedError,
    Received,
    SendResult,
    check_send_args,
)
from epd.transfer.serialization import check_meta

_ids = itertools.count()


class LocalConnector(Connector):
    """send() to its own address appends to its own received queue; any other address is a ValueError."""

    name = "local"

    def __init__(self, *, device: str | torch.device = "cpu", host: str = "127.0.0.1") -> None:
        del host  # nothing to bind; accepted so every backend builds from the same arguments
        self.device = torch.device(device)
        self._address = f"local://{os.getpid()}/{next(_ids)}"
        self._received: deque[Received] = deque()
        self._sent: deque[SendResult] = deque()
        self._closed = False

    @property
    def address(self) -> str:
        return self._address

    def send(
        self, dest: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        check_send_args(key, tensors, meta)
        meta = check_meta(meta)
        if self._closed:
            raise ConnectorClosedError(f"send({key!r}) on a closed local connector")
        if dest != self._address:
            raise ValueError(f"local connector {self._address} can only send to itself, not to {dest!r}")
        started, sent_at = time.perf_counter(), time.time()
        moved = {name: tensor.to(self.device) for name, tensor in tensors.items()}
        nbytes = sum(t.numel() * t.element_size() for t in moved.values())
        self._received.append(Received(key, moved, meta, nbytes, sent_at))
        self._sent.append(SendResult(key, dest, True, nbytes, time.perf_counter() - started))

    def poll_sent(self) -> list[SendResult]:
        return _drain(self._sent)

    def poll_received(self) -> list[Received]:
        return _drain(self._received)

    def pollables(self) -> list[Any]:
        return []

    def close(self) -> None:
        self._closed = True
        self._received.clear()
        self._sent.clear()


def _drain(items: deque) -> list:
    out = []
    while items:
        out.append(items.popleft())
    return out
