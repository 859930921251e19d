"""Input processing (chat template, tokens, images) in worker threads, stopped when nobody waits.

A thread cannot be killed, so a request that is cancelled (its client left, or the shutdown
ended it) asks its thread to stop, and the thread does at the next image it would decode or
preprocess (epd.inputs.cancel). The request's coroutine waits for
that before it ends, so its admission slot is held until the thread has stopped: abandoned
requests cannot fill the thread pool behind admission's back.

Requests without images have workers of their own: a burst of image decoding (a second or
more per large image) never makes a text request wait for a free thread.

| metric                              | kind    | what                                           |
|-------------------------------------|---------|------------------------------------------------|
| epd_requests_preprocessing          | gauge   | requests whose input is being processed now    |
| epd_preprocessing_cancelled_total   | counter | input processing stopped because nobody waited |
"""

from __future__ import annotations

import asyncio
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge

from epd.inputs.cancel import ImageLoadingCancelled, cancel_image_loading_on

T = TypeVar("T")
WORKERS = min(32, (os.cpu_count() or 1) + 4)  # per pool: what asyncio's default executor has


class Preprocessing:
    """Runs input processing; `close` when the server stops."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._pools = {
            True: ThreadPoolExecutor(WORKERS, thread_name_prefix="epd-input-images"),
            False: ThreadPoolExecutor(WORKERS, thread_name_prefix="epd-input-text"),
        }
        self.running = Gauge(
            "epd_requests_preprocessing", "requests whose input is being processed now", registry=registry
        )
        self.cancelled = Counter(
            "epd_preprocessing_cancelled",
            "input processing stopped early because nobody waited for it",
            registry=registry,
        )

    async def run(self, work: Callable[[], T], has_images: bool) -> T:
        """`work()` in a worker thread. Cancelled, this stops the thread and waits for it."""
        stop = threading.Event()
        pool = self._pools[has_images]
        future = asyncio.get_running_loop().run_in_executor(pool, _stoppable, work, stop)
        self.running.inc()
        future.add_done_callback(self._finished)
        try:
            return await asyncio.shield(future)  # shielded: still ours to wait for when cancelled
        except asyncio.CancelledError:
            stop.set()
            await asyncio.wait({future})  # a second cancellation (forced shutdown) stops this wait
            raise

    def close(self) -> None:
        """Stop taking work. Threads still running finish their request (the ones the drain
        ended stop at their next image); the interpreter joins them at exit."""
        for pool in self._pools.values():
            pool.shutdown(wait=False, cancel_futures=True)

    def _finished(self, future: asyncio.Future) -> None:
        self.running.dec()
        if not future.cancelled() and isinstance(future.exception(), ImageLoadingCancelled):
            self.cancelled.inc()


def _stoppable(work: Callable[[], T], stop: threading.Event) -> T:
    with cancel_image_loading_on(stop):
        return work()
