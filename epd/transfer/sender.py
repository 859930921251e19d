"""The producer half of the socket-based connectors: one background thread that owns every PUSH socket.

Why a thread: send() must return at once even for a 100 MB payload, and ZMQ sockets are not
thread-safe, so the sockets that push payloads are created, used and closed by this thread only.
The caller talks to it through a job queue plus a wake-up pipe, and reads completions from a result
queue; both queues are thread-safe, so send() and poll_sent() may come from any thread.

Life of a job in the thread (one deque per dest keeps FIFO per (producer, dest) pair, and a stalled
dest holds up only its own jobs):

    queued --dest writable--> encoded (backend) --handed to ZMQ, tracked--> ZMQ released the bytes: ok
       |                         |
       +-- dest not writable ----+-- encode raised -------------------------------------------> failed
           for send_timeout_s                                (the backend's discard() cleans its side)

Results: ok per dest in send order (a key is reported once it and every earlier key to that dest
are released), failures at once.

PUSH sockets use ZMQ_IMMEDIATE: a message is only queued to a peer that completed its handshake, so a
dest that never comes up fails after send_timeout_s instead of holding messages in a pipe forever.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import zmq

from epd.transfer.base import SendResult
from epd.transfer.job_thread import JobThread

logger = logging.getLogger(__name__)

_TRACKER_WAIT_MIN_MS = 1  # while payloads are in flight, how often to look at their trackers...
_TRACKER_WAIT_MAX_MS = 50  # ...backing off to this while nothing completes (e.g. a stopped consumer)
_LINGER_MS = 1000  # at close, how long ZMQ keeps trying to flush messages it already accepted


@dataclass(eq=False)
class SendJob:
    dest: str
    key: str
    tensors: dict[str, torch.Tensor]  # the caller's tensors, referenced until the job ends
    meta: dict[str, Any]
    nbytes: int
    sent_at: float  # time.time() at send(), travels to the consumer
    started: float  # time.perf_counter() at send(), for SendResult.seconds
    frames: list[Any] | None = None  # buffers to send, built by the backend once the dest is writable
    state: Any = None  # the backend's own bookkeeping (shm: the segment's path)

    def result(self, error: str | None = None) -> SendResult:
        seconds = time.perf_counter() - self.started
        return SendResult(self.key, self.dest, error is None, self.nbytes, seconds, error)


Encode = Callable[[SendJob], list[Any]]
Discard = Callable[[SendJob], None]


class SendLoop(JobThread):
    """Runs the jobs of one connector on a daemon thread; see the module docstring for the automaton.

    `encode(job)` builds the frames of a job (runs in the thread, may raise: the job then fails);
    `discard(job)` undoes what encode left behind for a job that failed or was abandoned.
    """

    def __init__(self, encode: Encode, discard: Discard, send_timeout_s: float, name: str) -> None:
        self._encode = encode
        self._discard = discard
        self._timeout = send_timeout_s
        super().__init__(f"epd-{name}-send")

    # ---- everything below runs in the thread ----
    def _run(self) -> None:
        sockets: dict[str, zmq.Socket] = {}
        pending: dict[str, deque[SendJob]] = {}
        in_flight: list[tuple[SendJob, zmq.MessageTracker]] = []
        tracker_wait = _TRACKER_WAIT_MIN_MS
        try:
            while not self._stop.is_set():
                self._take_jobs_into(pending)
                before = len(in_flight)
                blocked = self._push(pending, sockets, in_flight)
                progressed = len(in_flight) > before
                progressed |= self._reap(in_flight)
                # Trackers have no fd to wait on: look often while bytes flow, back off while they don't.
                tracker_wait = (
                    _TRACKER_WAIT_MIN_MS if progressed else min(2 * tracker_wait, _TRACKER_WAIT_MAX_MS)
                )
                self._wait(blocked, tracker_wait if in_flight else None)
                self._drain_wakeups()
        finally:
            for jobs in pending.values():
                for job in jobs:
                    self._discard(job)
            for sock in sockets.values():
                sock.close(linger=_LINGER_MS)

    def _take_jobs_into(self, pending: dict[str, deque[SendJob]]) -> None:
        for job in self._take_jobs():
            pending.setdefault(job.dest, deque()).append(job)

    def _push(
        self,
        pending: dict[str, deque[SendJob]],
        sockets: dict[str, zmq.Socket],
        in_flight: list[tuple[SendJob, zmq.MessageTracker]],
    ) -> list[tuple[zmq.Socket, float]]:
        """Hand every job whose dest can take it to ZMQ; return (socket, deadline) of each blocked dest."""
        blocked = []
        for dest in list(pending):
            jobs = pending[dest]
            waiting = self._push_dest(dest, jobs, sockets, in_flight)
            if waiting is not None:
                blocked.append(waiting)
            if not jobs:
                del pending[dest]
        return blocked

    def _push_dest(
        self,
        dest: str,
        jobs: deque[SendJob],
        sockets: dict[str, zmq.Socket],
        in_flight: list[tuple[SendJob, zmq.MessageTracker]],
    ) -> tuple[zmq.Socket, float] | None:
        """Send `dest`'s jobs in order until one must wait; that one's (socket, deadline), or None."""
        while jobs:
            job = jobs[0]
            sock = sockets.get(dest) or self._connect(dest, sockets)
            if sock is None:
                self._fail(jobs.popleft(), f"cannot connect to {dest!r}")
                continue
            try:
                tracker = self._try_send(sock, job)
            except Exception as exc:  # an encode error (bad dtype, disk full) fails the send, not the thread
                self._fail(jobs.popleft(), f"{type(exc).__name__}: {exc}")
                continue
            if tracker is not None:
                in_flight.append((jobs.popleft(), tracker))
                continue
            deadline = job.started + self._timeout
            if time.perf_counter() < deadline:
                return sock, deadline
            self._fail(jobs.popleft(), f"peer {dest} did not take the message within {self._timeout}s")
        return None

    def _connect(self, dest: str, sockets: dict[str, zmq.Socket]) -> zmq.Socket | None:
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.IMMEDIATE, 1)
        try:
            sock.connect(dest)
        except zmq.ZMQError:
            sock.close(linger=0)
            return None
        sockets[dest] = sock
        return sock

    def _try_send(self, sock: zmq.Socket, job: SendJob) -> zmq.MessageTracker | None:
        """Send `job` if `sock` can take it now; its tracker, or None when the dest is not writable."""
        if not sock.get(zmq.EVENTS) & zmq.POLLOUT:
            return None
        if job.frames is None:  # encoded only now that the peer is there: shm writes no orphan segment
            job.frames = self._encode(job)
        # Large buffers go zero-copy (small ones are copied by pyzmq); one tracker per frame, since
        # send_multipart would only track the last one.
        frames = [zmq.Frame(buffer, track=True) for buffer in job.frames]
        try:
            sock.send(frames[0], zmq.NOBLOCK | (zmq.SNDMORE if len(frames) > 1 else 0))
        except zmq.Again:
            return None
        # Once the first part is queued the others cannot hit the high-water mark (it counts messages).
        for i, frame in enumerate(frames[1:], start=2):
            sock.send(frame, zmq.SNDMORE if i < len(frames) else 0)
        return zmq.MessageTracker(*frames)

    def _reap(self, in_flight: list[tuple[SendJob, zmq.MessageTracker]]) -> bool:
        """Report finished jobs, per dest in send order: a small key queued behind a large one is copied
        and released first, but reporting it first would break the FIFO promise. True if any finished."""
        still: list[tuple[SendJob, zmq.MessageTracker]] = []
        waiting_dests: set[str] = set()
        for job, tracker in in_flight:
            if job.dest in waiting_dests or not tracker.done:
                waiting_dests.add(job.dest)
                still.append((job, tracker))
            else:
                self._results.put(job.result())
        reported = len(still) < len(in_flight)
        in_flight[:] = still
        return reported

    def _fail(self, job: SendJob, error: str) -> None:
        logger.warning("transfer of %r to %s failed: %s", job.key, job.dest, error)
        self._discard(job)
        self._results.put(job.result(error))

    def _wait(self, blocked: list[tuple[zmq.Socket, float]], wait_ms: int | None) -> None:
        poller = zmq.Poller()
        poller.register(self._wake_r, zmq.POLLIN)
        timeouts = [] if wait_ms is None else [wait_ms]
        now = time.perf_counter()
        for sock, deadline in blocked:
            poller.register(sock, zmq.POLLOUT)
            timeouts.append(max(0, int((deadline - now) * 1000) + 1))
        poller.poll(min(timeouts) if timeouts else None)
