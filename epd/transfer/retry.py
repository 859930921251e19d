"""Bounded retries on the same pair: a `Connector` around any backend (`create_connector` adds it).

A send that the backend reports failed (its dest took nothing within the backend's send_timeout_s,
it could not connect, encoding raised) is sent again to the same dest, with the same key, tensors
and meta, at most `retries` times. Only then is its failure reported, the error starting with
`GAVE_UP`: the instance tells the router, whose recovery places the request anew
(epd.cluster.router.recovery) instead of leaving it waiting for a transfer that will not come.

| the backend reports, for a send | attempts so far   | the caller's poll_sent() gets                |
|---------------------------------|-------------------|----------------------------------------------|
| ok                              | any               | ok (`seconds`: from the first attempt)       |
| failed                          | 1 .. retries      | nothing yet: it is sent again                |
| failed                          | retries + 1       | failed: "gave up after N attempts: <error>"  |
| failed, and sending again raises| any               | failed, with what it raised                  |

What the backend's contract (base.py) becomes:
- Order: a retried key arrives after the keys sent after it that did not fail. No receiver needs
  more: embeddings (`mm:`) and whole KV hand-offs are independent keys, and a decode instance
  holds a hand-off until the streamed layers retried behind it arrive (epd.cluster.kv_handoff).
- Buffers: the caller's tensors are kept until the key's result is reported (item 3 as before);
  a retry sends those very tensors.
- Results are matched to sends by (dest, key), oldest first. A key names its content (`mm:<hash>`
  is content-addressed, KV keys carry the request's attempt id), so when one key goes to one dest
  twice, it does not matter which of the two sends a result is taken for.

Counters (`stats`): retries made, and sends given up after the last one.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from dataclasses import dataclass
from typing import Any

import torch

from epd.transfer.base import DEFAULT_RETRIES, Connector, SendResult
from epd.transfer.staging import RegionTooLargeError

logger = logging.getLogger(__name__)

GAVE_UP = "gave up after"  # how the error of a send that used up its retries starts


@dataclass(eq=False)
class _Send:
    dest: str
    key: str
    tensors: dict[str, torch.Tensor]
    meta: dict[str, Any] | None
    started: float  # time.perf_counter() at the first attempt
    attempts: int = 1


class RetryingConnector(Connector):
    """`inner` with each failed send sent again up to `retries` times (module docstring)."""

    def __init__(self, inner: Connector, retries: int = DEFAULT_RETRIES) -> None:
        if retries < 0:
            raise ValueError(f"retries must be >= 0, got {retries}")
        self.inner, self.retries = inner, retries
        self._lock = threading.Lock()  # send() and poll_sent() may come from different threads
        self._outstanding: dict[tuple[str, str], deque[_Send]] = {}
        self.retries_total = 0
        self.gave_up_total = 0

    @property
    def name(self) -> str:  # type: ignore[override]  # the backend's: "local" means no transfers
        return self.inner.name

    @property
    def address(self) -> str:
        return self.inner.address

    def __getattr__(self, attr: str) -> Any:
        # What the backend offers beyond the interface (shm's segment_prefix...), as it is.
        if attr == "inner":
            raise AttributeError(attr)
        return getattr(self.inner, attr)

    # ---- producer side ----
    def send(
        self, dest: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        pending = _Send(dest, key, tensors, meta, time.perf_counter())
        with self._lock:  # before the backend's send: its result may be polled at once
            self._outstanding.setdefault((dest, key), deque()).append(pending)
        try:
            self.inner.send(dest, key, tensors, meta)
        except BaseException:  # bad arguments or a closed connector: raised to the caller, as ever
            with self._lock:
                self._forget(pending)
            raise

    def poll_sent(self) -> list[SendResult]:
        reported = []
        for result in self.inner.poll_sent():
            final = self._settle(result)
            if final is not None:
                reported.append(final)
        return reported

    def stats(self) -> dict[str, float]:
        return {"transfer_retries_total": self.retries_total, "transfer_gave_up_total": self.gave_up_total}

    # ---- consumer side: the backend's ----
    def poll_received(self) -> list:
        return self.inner.poll_received()

    def pollables(self) -> list[Any]:
        return self.inner.pollables()

    def close(self) -> None:
        self.inner.close()
        with self._lock:
            self._outstanding.clear()

    # ---- retries ----
    def _settle(self, result: SendResult) -> SendResult | None:
        """The result to report for the backend's `result`; None when the send goes out again."""
        with self._lock:
            sends = self._outstanding.get((result.dest, result.key))
            if not sends:
                return result  # abandoned at close()
            pending = sends[0]
            done = result.ok or pending.attempts > self.retries or _permanent(result.error)
            if done:
                self._forget(pending)
            else:
                pending.attempts += 1
                self.retries_total += 1
        if done:
            return self._final(pending, result)
        logger.warning(
            "transfer of %r to %s failed (%s); attempt %d of %d",
            result.key,
            result.dest,
            result.error,
            pending.attempts,
            self.retries + 1,
        )
        try:
            self.inner.send(pending.dest, pending.key, pending.tensors, pending.meta)
        except Exception as exc:  # closed meanwhile: nothing more will come for it
            with self._lock:
                self._forget(pending)
            return self._final(pending, result, f"{type(exc).__name__}: {exc}")
        return None

    def _final(self, pending: _Send, result: SendResult, error: str | None = None) -> SendResult:
        seconds = time.perf_counter() - pending.started
        if result.ok and error is None:
            return SendResult(result.key, result.dest, True, result.nbytes, seconds)
        self.gave_up_total += 1
        n = pending.attempts
        error = f"{GAVE_UP} {n} attempt{'s' if n > 1 else ''}: {error or result.error}"
        return SendResult(result.key, result.dest, False, result.nbytes, seconds, error)

    def _forget(self, pending: _Send) -> None:
        key = (pending.dest, pending.key)
        sends = self._outstanding.get(key)
        if sends is not None and pending in sends:
            sends.remove(pending)
            if not sends:
                del self._outstanding[key]


def connector_stats(connector: Connector) -> dict[str, float]:
    """The retry counters of `connector` ({} for one without retries)."""
    return connector.stats() if isinstance(connector, RetryingConnector) else {}


# Failures that another attempt cannot cure: the payload itself does not fit (reported at once,
# so the caller learns it in the order it sent, as without retries).
_PERMANENT = (f"{RegionTooLargeError.__name__}:",)


def _permanent(error: str | None) -> bool:
    return error is not None and error.startswith(_PERMANENT)
