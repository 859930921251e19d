"""Fault injection for tests: a real connector whose chosen sends fail.

`DropSends` sits between the retries (epd.transfer.retry) and a real backend: it fails the sends
its rule picks without passing them on (as a backend reports a send that never left) and passes on
the rest, so what is under test is what the layers above make of failures, while the bytes that
do move go through the real connector.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from typing import Any

import torch

from epd.transfer.base import Connector, SendResult

DROPPED = "dropped by the test"


class DropSends(Connector):
    """`inner` with the sends `drop(key, dest)` picks failed (nothing sent), the rest passed on."""

    def __init__(self, inner: Connector, drop: Callable[[str, str], bool]) -> None:
        self.inner, self.drop = inner, drop
        self.name = inner.name
        self.dropped: list[str] = []
        self._failed: deque[SendResult] = deque()

    @property
    def address(self) -> str:
        return self.inner.address

    def send(self, dest: str, key: str, tensors: dict[str, torch.Tensor], meta: Any = None) -> None:
        if self.drop(key, dest):
            self.dropped.append(key)
            self._failed.append(SendResult(key, dest, False, 0, 0.0, DROPPED))
        else:
            self.inner.send(dest, key, tensors, meta)

    def poll_sent(self) -> list[SendResult]:
        failed = list(self._failed)
        self._failed.clear()
        return failed + self.inner.poll_sent()

    def poll_received(self) -> list:
        return self.inner.poll_received()

    def pollables(self) -> list:
        return self.inner.pollables()

    def close(self) -> None:
        self.inner.close()
