"""The consumer half of the nccl connector: one thread that reads notices and posts the recvs.

Why a thread of its own, not the caller's poll_received(): a producer's sends wait on the GPU for
the matching recvs, so recvs are posted the moment a notice arrives, whatever the instance loop is
busy with; the caller only collects what has landed (a wake-up pipe is its pollable).

Life of a pair here, by the id its producer chose:

    Hello --> connecting (set-up thread: group, warm-up byte) --> ready --> gone
                 | notices are kept in order                        |  each notice (a batch of keys):
                 +-- set-up failed or took longer than timeout_s ---+  fresh tensors, its recvs posted
                                                                    |  as one batch; its keys delivered
                                                                    |  once it is done, in order
                                                  an op not done within timeout_s (the producer
                                                  died): the group is aborted, the pair dropped

A key is delivered only when its recvs completed on the device (an event, polled): a producer that
dies mid-transfer then costs its own keys, never a stream of the caller that waits for ever.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field

import msgspec
import torch
import torch.distributed as dist
import zmq

from epd.transfer.base import Received
from epd.transfer.nccl_channel import CONSUMER_RANK, NOTICE_DECODER, Channel, Completion, Hello, Notice
from epd.transfer.serialization import Header

logger = logging.getLogger(__name__)

_POLL_MIN_MS, _IDLE_POLL_MS = 0, 100  # idle: only bounds how late close() is seen
# While recvs are in flight and nothing arrives: a pause from 20 us, doubled up to 100 us. The
# pause is a sleep (a notice cannot wake it), and a producer's next send waits on the GPU until
# its recv is posted here: at the 2 ms it once reached, 16 MB messages streamed at 39% of NCCL's
# send/recv rate (BENCHMARKS.md).
_BACKOFF_S, _BACKOFF_MAX_S = 20e-6, 100e-6


@dataclass(eq=False)
class _Landing:
    """One notice's batch of keys, posted as one batch of recvs."""

    headers: tuple[Header, ...]
    tensors: list[dict[str, torch.Tensor]]  # per header
    completion: Completion
    deadline: float


@dataclass(eq=False)
class _Pair:
    pair: str
    created: float
    waiting: deque[tuple[Header, ...]] = field(default_factory=deque)  # notices not posted yet
    in_flight: deque[_Landing] = field(default_factory=deque)
    channel: Channel | None = None
    setup_error: str | None = None
    abandoned: bool = False


class NcclRecvLoop:
    """Receives for one connector on `pull` (bound by the caller; this thread owns it from now on)."""

    def __init__(
        self, pull: zmq.Socket, store: dist.Store, backend: str, transport: torch.device, timeout_s: float
    ) -> None:
        self._pull, self._store, self._backend = pull, store, backend
        self._transport, self._timeout = transport, timeout_s
        self._pairs: dict[str, _Pair] = {}
        self._landed: queue.SimpleQueue[Received] = queue.SimpleQueue()
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="epd-nccl-recv", daemon=True)
        self._thread.start()

    @property
    def pollable(self) -> int:
        """An fd that turns readable when take() has keys."""
        return self._wake_r

    def take(self) -> list[Received]:
        """Keys landed since the last call (caller's thread)."""
        try:  # the wake-ups first: a key landing after this read still leaves its own wake-up
            while os.read(self._wake_r, 4096):
                pass
        except BlockingIOError:
            pass
        out = []
        while not self._landed.empty():
            out.append(self._landed.get_nowait())
        return out

    def close(self, timeout_s: float = 10.0) -> None:
        self._stop.set()
        self._thread.join(timeout_s)
        if self._thread.is_alive():
            logger.warning("nccl receive thread did not stop within %.1fs", timeout_s)
            return
        os.close(self._wake_r)
        os.close(self._wake_w)

    # ---- everything below runs in the thread ----
    def _run(self) -> None:
        if self._transport.type == "cuda":
            torch.cuda.set_device(self._transport)
        pause = _BACKOFF_S
        try:
            while not self._stop.is_set():
                busy = any(p.waiting or p.in_flight for p in self._pairs.values())
                arrived = self._pull.poll(_POLL_MIN_MS if busy else _IDLE_POLL_MS)
                if arrived:
                    self._read_notices()
                progressed = arrived > 0
                for pair_id, pair in list(self._pairs.items()):
                    progressed |= self._advance(pair)
                    if pair.abandoned:
                        del self._pairs[pair_id]
                pause = _BACKOFF_S if progressed else min(2 * pause, _BACKOFF_MAX_S)
                if busy and not progressed:
                    time.sleep(pause)
        finally:
            for pair in self._pairs.values():
                self._drop(pair, None)
            self._pull.close(linger=0)

    def _read_notices(self) -> None:
        while True:
            try:
                data = self._pull.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            try:
                message = NOTICE_DECODER.decode(data)
            except (msgspec.DecodeError, msgspec.ValidationError) as exc:
                logger.warning("nccl connector dropped a malformed notice: %s", exc)
                continue
            if isinstance(message, Hello):
                self._hello(message.pair)
            else:
                self._notice(message)

    def _hello(self, pair_id: str) -> None:
        pair = self._pairs[pair_id] = _Pair(pair_id, time.monotonic())
        threading.Thread(target=self._connect, args=(pair,), name="epd-nccl-accept", daemon=True).start()

    def _notice(self, notice: Notice) -> None:
        pair = self._pairs.get(notice.pair)
        if pair is None:  # its pair broke here already: the producer fails the keys on its side
            keys = [header.key for header in notice.headers]
            logger.info("nccl connector dropped %s of a pair it no longer has", keys)
            return
        if notice.headers:
            pair.waiting.append(notice.headers)

    def _connect(self, pair: _Pair) -> None:
        try:
            channel = Channel.connect(
                self._backend, self._store, pair.pair, CONSUMER_RANK, self._transport, self._timeout
            )
        except Exception as exc:
            pair.setup_error = f"{type(exc).__name__}: {exc}"
        else:
            if pair.abandoned:
                channel.abort()
            else:
                pair.channel = channel

    def _advance(self, pair: _Pair) -> bool:
        """Post recvs, deliver what landed, drop a broken pair; True if anything moved."""
        now = time.monotonic()
        if pair.channel is None:
            if pair.setup_error is not None or now > pair.created + self._timeout:
                self._drop(pair, f"set-up failed: {pair.setup_error or f'took over {self._timeout}s'}")
            return False
        moved = bool(pair.waiting)
        while pair.waiting:
            headers = pair.waiting.popleft()
            try:
                tensors, completion = pair.channel.post_recvs(list(headers))
            except Exception as exc:  # a communicator aborted under us, a header we cannot honour
                keys = [header.key for header in headers]
                self._drop(pair, f"posting the recvs of {keys}: {type(exc).__name__}: {exc}")
                return True
            pair.in_flight.append(_Landing(headers, tensors, completion, now + self._timeout))
        while pair.in_flight and pair.in_flight[0].completion.done():
            landing = pair.in_flight.popleft()
            if landing.completion.error is not None:
                self._drop(pair, landing.completion.error)
                return True
            self._deliver(landing)
            moved = True
        if pair.in_flight and now > pair.in_flight[0].deadline:
            key = pair.in_flight[0].headers[0].key
            self._drop(pair, f"the producer sent nothing for {key!r} in {self._timeout}s")
        return moved

    def _deliver(self, landing: _Landing) -> None:
        for header, tensors in zip(landing.headers, landing.tensors):
            self._landed.put(Received(header.key, tensors, header.meta, header.nbytes, header.sent_at))
        try:  # one wake-up for the batch: take() collects every key that landed
            os.write(self._wake_w, b"\0")
        except BlockingIOError:  # full: the caller has wake-ups pending
            pass

    def _drop(self, pair: _Pair, error: str | None) -> None:
        if error is not None:
            batches = [landing.headers for landing in pair.in_flight] + list(pair.waiting)
            lost = [header.key for headers in batches for header in headers]
            logger.warning("nccl pair %s dropped (%s); keys lost here: %s", pair.pair, error, lost)
        pair.abandoned = True
        pair.waiting.clear()
        pair.in_flight.clear()
        if pair.channel is not None:
            pair.channel.abort()
