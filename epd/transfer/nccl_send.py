"""The producer half of the nccl connector: one thread that owns every pair's notice socket and ops.

Life of a pair (one per dest; a broken one is dropped and the next send to that dest makes a new one,
under a new id, so the consumer never mixes the ops of two generations):

    new --Hello pushed--> connecting --set-up thread: group built, warm-up byte moved--> ready
     |                        |                                                          |
     +------------------------+-- set-up failed, or the first job's deadline passed -----+-- an op not
                                                                                           done by its
                                                  broken: every job queued or in flight    deadline:
                                                  fails now; the group is aborted  <-------- broken

Life of a job on a ready pair: it joins a batch with every job queued behind it for that pair (up
to _BATCH_MAX_JOBS / _BATCH_MAX_BYTES): one Notice carrying their headers is pushed, then their sends
are posted on the pair's side stream as one batch (after the caller's stream reached each send();
the notice goes first, so that the consumer posts the matching recvs even while a first op to a new
peer connects), then the batch waits in the pair's in-flight queue until its ops completed on the
device: then its jobs are reported ok, in send order.

Why batches: each message used to cost a notice, a ZMQ push, an NCCL Work with its events and a
CUDA event of its own (~0.16 ms of this thread on an H200 host, more than NCCL takes for 16 MB);
a batch pays those once. Nothing waits to fill one: a job that finds the pair idle leaves alone.
"""

from __future__ import annotations

import itertools
import logging
import select
import threading
import time
import uuid
from collections import deque
from dataclasses import dataclass, field

import torch
import zmq

from epd.transfer.job_thread import JobThread
from epd.transfer.nccl_channel import (
    PRODUCER_RANK,
    Channel,
    Completion,
    Hello,
    Notice,
    open_store,
    parse_address,
)
from epd.transfer.sender import SendJob
from epd.transfer.serialization import Header, encode, spec_of

logger = logging.getLogger(__name__)

# Completions have no fd: look often while ops are in flight (a send reported late holds up a
# caller that waits for it, and the 2 ms this once backed off to cost a 16 MB send more than the
# bytes did), never more than every 200 us.
_POLL_MIN_S, _POLL_MAX_S = 20e-6, 200e-6
# A batch's jobs are reported together (one event), so a bound keeps the first of a long queue from
# waiting for the whole queue's bytes; 256 MB is ~1 ms of NVLink.
_BATCH_MAX_JOBS, _BATCH_MAX_BYTES = 32, 256 << 20


@dataclass(eq=False)
class _Flight:
    jobs: list[SendJob]  # one batch, in send order
    completion: Completion


@dataclass(eq=False)
class _Pair:
    dest: str
    pair: str  # this generation's id
    socket: zmq.Socket
    pending: deque[SendJob] = field(default_factory=deque)
    in_flight: deque[_Flight] = field(default_factory=deque)
    hello_sent: bool = False
    channel: Channel | None = None  # set by the set-up thread once the pair is connected
    setup_error: str | None = None
    abandoned: bool = False  # the loop gave up on it: a late set-up aborts what it built


class NcclSendLoop(JobThread):
    """Runs the sends of one connector (module docstring); submit() and results() from any thread."""

    def __init__(self, backend: str, device: torch.device, timeout_s: float) -> None:
        self._backend, self._device, self._timeout = backend, device, timeout_s
        self._pairs: dict[str, _Pair] = {}
        super().__init__("epd-nccl-send")

    # ---- everything below runs in the thread ----
    def _run(self) -> None:
        if self._device.type == "cuda":
            torch.cuda.set_device(self._device)
        pause = _POLL_MIN_S
        try:
            while not self._stop.is_set():
                self._take_new_jobs()
                progressed = False
                for dest, pair in list(self._pairs.items()):
                    before = (len(pair.pending), len(pair.in_flight), pair.channel is None)
                    if not self._advance(pair):
                        self._break(pair, pair.setup_error or "the pair broke")
                        del self._pairs[dest]
                    progressed |= before != (len(pair.pending), len(pair.in_flight), pair.channel is None)
                busy = any(p.pending or p.in_flight for p in self._pairs.values())
                pause = _POLL_MIN_S if progressed else min(2 * pause, _POLL_MAX_S)
                select.select([self._wake_r], [], [], pause if busy else None)
                self._drain_wakeups()
        finally:
            for pair in self._pairs.values():
                self._close_pair(pair)

    def _take_new_jobs(self) -> None:
        for job in self._take_jobs():
            pair = self._pairs.get(job.dest)
            if pair is None:
                try:
                    pair = self._pairs[job.dest] = self._new_pair(job.dest)
                except (ValueError, zmq.ZMQError) as exc:
                    self._fail(job, f"cannot reach {job.dest!r}: {exc}")
                    continue
            pair.pending.append(job)

    def _new_pair(self, dest: str) -> _Pair:
        parse_address(dest)  # ValueError for an address that is not an nccl connector's
        sock = zmq.Context.instance().socket(zmq.PUSH)
        sock.setsockopt(zmq.IMMEDIATE, 1)  # queue notices only to a consumer that is there
        sock.setsockopt(zmq.LINGER, 0)
        sock.connect(parse_address(dest).notice_endpoint)
        return _Pair(dest, uuid.uuid4().hex, sock)

    def _advance(self, pair: _Pair) -> bool:
        """Move `pair` along (module docstring); False when it broke."""
        if not pair.hello_sent:
            if not self._push(pair, Hello(pair.pair)):
                return not self._overdue(pair)
            pair.hello_sent = True
            threading.Thread(target=self._connect, args=(pair,), name="epd-nccl-connect", daemon=True).start()
        if pair.channel is None:
            return pair.setup_error is None and not self._overdue(pair)
        posted = self._post_pending(pair)
        return self._reap(pair) and posted

    def _post_pending(self, pair: _Pair) -> bool:
        """Notice, then sends, for the queued jobs in batches, in order; False once a notice is overdue."""
        while pair.pending:
            jobs = _next_batch(pair.pending)
            if not self._push(pair, Notice(pair.pair, tuple(_header(job) for job in jobs))):
                return not self._overdue(pair)
            try:
                batch = [(list(job.tensors.values()), job.state) for job in jobs]
                completion = pair.channel.post_sends(batch)
            except Exception as exc:  # e.g. the communicator was aborted (its peer died)
                keys = ", ".join(repr(job.key) for job in jobs)
                pair.setup_error = f"posting the sends of {keys}: {type(exc).__name__}: {exc}"
                return False
            for _ in jobs:
                pair.pending.popleft()
            pair.in_flight.append(_Flight(jobs, completion))
        return True

    def _reap(self, pair: _Pair) -> bool:
        while pair.in_flight and pair.in_flight[0].completion.done():
            flight = pair.in_flight.popleft()
            if flight.completion.error is not None:
                pair.in_flight.appendleft(flight)
                pair.setup_error = flight.completion.error
                return False
            for job in flight.jobs:
                job.tensors = {}
                self._results.put(job.result())
        if pair.in_flight and self._overdue(pair, pair.in_flight[0].jobs[0]):
            pair.setup_error = f"the consumer at {pair.dest} did not take the payload within {self._timeout}s"
            return False
        return True

    def _overdue(self, pair: _Pair, job: SendJob | None = None) -> bool:
        job = job or (pair.pending[0] if pair.pending else None)
        if job is None or time.perf_counter() < job.started + self._timeout:
            return False
        if pair.setup_error is None:
            pair.setup_error = f"no nccl pair with {pair.dest} within {self._timeout}s"
        return True

    def _push(self, pair: _Pair, message: Hello | Notice) -> bool:
        try:
            pair.socket.send(encode(message), zmq.NOBLOCK)
            return True
        except zmq.Again:  # the consumer is not there (yet)
            return False

    def _connect(self, pair: _Pair) -> None:
        """Set-up thread: the group and the warm-up (blocking until the consumer joins)."""
        try:
            peer = parse_address(pair.dest)
            store = open_store(peer.host, peer.store_port, self._timeout)
            channel = Channel.connect(
                self._backend, store, pair.pair, PRODUCER_RANK, self._device, self._timeout
            )
        except Exception as exc:
            pair.setup_error = f"nccl set-up with {pair.dest} failed: {type(exc).__name__}: {exc}"
        else:
            if pair.abandoned:
                channel.abort()
            else:
                pair.channel = channel
        self._wake()

    def _break(self, pair: _Pair, error: str) -> None:
        for flight in pair.in_flight:
            for job in flight.jobs:
                self._fail(job, error)
        for job in pair.pending:
            self._fail(job, error)
        pair.in_flight.clear()
        pair.pending.clear()
        self._close_pair(pair)

    def _close_pair(self, pair: _Pair) -> None:
        pair.abandoned = True
        if pair.channel is not None:
            pair.channel.abort()
        pair.socket.close(linger=0)

    def _fail(self, job: SendJob, error: str) -> None:
        logger.warning("nccl transfer of %r to %s failed: %s", job.key, job.dest, error)
        job.tensors = {}
        self._results.put(job.result(error))


def _next_batch(pending: deque[SendJob]) -> list[SendJob]:
    """The jobs at the head of `pending` that go as one batch: at least one, within the bounds."""
    jobs, nbytes = [pending[0]], pending[0].nbytes
    for job in itertools.islice(pending, 1, _BATCH_MAX_JOBS):
        nbytes += job.nbytes
        if nbytes > _BATCH_MAX_BYTES:
            break
        jobs.append(job)
    return jobs


def _header(job: SendJob) -> Header:
    specs = tuple(spec_of(name, tensor) for name, tensor in job.tensors.items())
    return Header(job.key, job.sent_at, job.meta, specs)
