"""The plumbing every connector's send thread shares: a job queue and a wake-up pipe in, a result
queue out, and a stop that waits for the thread. Subclasses write `_run` (it owns their sockets or
communicators) and wait on `_wake_r` beside whatever else they watch.

Why a pipe and not only the queue: the thread sleeps in a poll or select over its sockets, and a
byte on the pipe is what wakes it for a new job or a stop; `_drain_wakeups` clears the bytes only
right after waking and before the next look at the stop flag and the queue, so a consumed byte
can never hide a job or a stop from that look.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from abc import ABC, abstractmethod
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from epd.transfer.base import SendResult
    from epd.transfer.sender import SendJob

logger = logging.getLogger(__name__)


class JobThread(ABC):
    """Runs `_run` on a daemon thread named `name`; `submit()`, `results()` and `close()` may come
    from any thread."""

    def __init__(self, name: str) -> None:
        self._jobs: queue.SimpleQueue[SendJob] = queue.SimpleQueue()
        self._results: queue.SimpleQueue[SendResult] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self._thread.start()

    @abstractmethod
    def _run(self) -> None: ...

    def submit(self, job: SendJob) -> None:
        self._jobs.put(job)
        self._wake()

    def results(self) -> list[SendResult]:
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                return out

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread (abandoning unfinished jobs) and free its pipe."""
        self._stop.set()
        self._wake()
        self._thread.join(timeout)
        if self._thread.is_alive():  # stuck in a syscall; its fds must outlive it, so leak them
            logger.warning("%s did not stop within %.1fs", self._thread.name, timeout)
            return
        os.close(self._wake_r)
        os.close(self._wake_w)

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"\0")
        except (BlockingIOError, OSError):  # full: wake-ups are pending anyway; closed: shutting down
            pass

    def _take_jobs(self) -> list[SendJob]:
        jobs = []
        while True:
            try:
                jobs.append(self._jobs.get_nowait())
            except queue.Empty:
                return jobs

    def _drain_wakeups(self) -> None:
        try:
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
