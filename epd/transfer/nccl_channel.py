"""One producer -> consumer pair of the nccl connector: its rendezvous, its process group, its ops.

Each (producer, consumer) pair gets a process group of its own, two ranks (producer 0, consumer 1),
built without torch.distributed's global state (no init_process_group): pairs come and go as
instances start, die and restart, and a dead peer must break its own pair only.

Rendezvous: every consumer runs a TCPStore server; its port is part of the consumer's address
(`nccl://host:notice_port/store_port`), which reaches producers the way every connector address
does: in the consumer's InstanceReady, then in the router's messages (the control plane). A producer
names the pair with a fresh id, tells the consumer that id in a Hello notice, and both build the
group on the consumer's store under that id as prefix, then exchange one byte (the warm-up) so
that the communicator and its connections exist before the first payload.

NCCL matches point-to-point ops between two ranks by order; so do our two sides: the producer posts
one send per non-empty tensor, in send() order, and the consumer posts the matching recvs in the
order the notices arrive (ZMQ keeps one producer's notices in order). Ops run on each side's own
CUDA stream (the connector's side stream: the NCCL stream waits on it, never on the caller's).

Batches: one notice carries the headers of every job the producer had queued for the pair, and
each side posts that notice's ops as one batch: one coalesced NCCL group (one ncclGroupStart/End,
one Work, one CUDA event, whatever the number of tensors), so a queue of small messages costs
Python and the driver once per batch rather than once per message. Both sides must group alike:
ProcessGroupNCCL runs coalesced p2p ops on another communicator (its per-device one) than single
ones (its "0:1" one), so a Channel coalesces every batch, the warm-up included, or none (a torch
without coalescing, and gloo: one op per tensor, matched in order all the same).

| backend | tensors travel from | completion seen by                                         |
|---------|---------------------|------------------------------------------------------------|
| nccl    | the device          | a CUDA event after the op (polled: a dead peer never ends it) |
| gloo    | host memory         | a waiter thread per pair (gloo's work has no non-blocking test) |

gloo exists so that the connector's logic (ordering, completion, failures, close) runs in CPU CI;
nccl is the one that moves GPU payloads.
"""

from __future__ import annotations

import contextlib
import logging
import os
import queue
import re
import threading
import time
from dataclasses import dataclass, field
from datetime import timedelta

import msgspec
import torch
import torch.distributed as dist

from epd.transfer.serialization import Header, TensorSpec, checked_dtype

logger = logging.getLogger(__name__)

BACKENDS = ("nccl", "gloo")
PRODUCER_RANK, CONSUMER_RANK = 0, 1
_ADDRESS = re.compile(r"nccl://(?P<host>[^/]+):(?P<port>\d+)/(?P<store_port>\d+)")


@dataclass(frozen=True)
class PeerAddress:
    """A consumer's address, taken apart: where its notices go, and where its store listens."""

    host: str
    notice_port: int
    store_port: int

    @property
    def notice_endpoint(self) -> str:
        return f"tcp://{self.host}:{self.notice_port}"

    def __str__(self) -> str:
        return f"nccl://{self.host}:{self.notice_port}/{self.store_port}"


def parse_address(address: str) -> PeerAddress:
    """`nccl://host:notice_port/store_port` -> PeerAddress; ValueError for anything else."""
    match = _ADDRESS.fullmatch(address) if isinstance(address, str) else None
    if match is None:
        raise ValueError(f"not an nccl connector address: {address!r} (nccl://host:port/store_port)")
    return PeerAddress(match["host"], int(match["port"]), int(match["store_port"]))


# ---- notices: producer -> consumer, over ZMQ ------------------------------------------------------
class Hello(msgspec.Struct, tag="hello", frozen=True):
    pair: str  # the pair's id: the prefix of its keys in the consumer's store


class Notice(msgspec.Struct, tag="notice", frozen=True):
    pair: str
    # One batch: the jobs' headers in send order; the ops that follow carry their tensors with
    # bytes, in that order, posted as one batch on both sides (module docstring).
    headers: tuple[Header, ...]


NOTICE_DECODER = msgspec.msgpack.Decoder(Hello | Notice)
_WARM_UP = Header("warm-up", 0.0, {}, (TensorSpec("byte", "uint8", (1,), 1),))


# ---- the bytes of a tensor, as the ops move them ---------------------------------------------------
def send_view(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A flat uint8 tensor on `device` over `tensor`'s bytes (a copy only where it must: another
    device, non-contiguous, conjugate or negative views). Bytes, so every dtype travels alike."""
    source = tensor.detach().resolve_conj().resolve_neg()
    if source.device != device:  # to a GPU: ordered on the current stream; to the host: synchronous
        source = source.to(device, non_blocking=device.type == "cuda")
    return source.contiguous().reshape(-1).view(torch.uint8)


def recv_view(tensor: torch.Tensor) -> torch.Tensor:
    """The flat uint8 view a recv fills, of a fresh contiguous `tensor`."""
    return tensor.reshape(-1).view(torch.uint8)


# ---- the pair's process group --------------------------------------------------------------------
def open_store(host: str, port: int, timeout_s: float) -> dist.Store:
    """A client of the consumer's TCPStore (the producer's side of the rendezvous)."""
    return dist.TCPStore(host, port, None, False, timedelta(seconds=timeout_s))


def serve_store(host: str, timeout_s: float) -> dist.TCPStore:
    """The consumer's TCPStore server, on a free port of `host` (its `.port`)."""
    return dist.TCPStore(host, 0, None, True, timedelta(seconds=timeout_s), wait_for_workers=False)


def _make_group(backend: str, store: dist.Store, rank: int, timeout_s: float) -> dist.Backend:
    timeout = timedelta(seconds=timeout_s)
    if backend == "gloo":
        return dist.ProcessGroupGloo(store, rank, 2, timeout)  # returns once both ranks connected
    # Our own deadlines abort a pair whose peer died; should NCCL's watchdog time an op out first,
    # it must abort that communicator only, not end the process (its default), and a watchdog
    # stuck on a dead peer's communicator must not have the process killed by the monitor either.
    os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "2")
    os.environ.setdefault("TORCH_NCCL_ENABLE_MONITORING", "0")
    options = dist.ProcessGroupNCCL.Options()
    options._timeout = timeout
    return dist.ProcessGroupNCCL(store, rank, 2, options)


def can_coalesce(group: dist.Backend) -> bool:
    """Whether `group` runs a batch of p2p ops as one coalesced group (ProcessGroupNCCL's
    _start_coalescing/_end_coalescing, what batch_isend_irecv uses); gloo does not.

    EPD_NCCL_COALESCE=0 says no (to compare, or to get around a torch whose coalescing
    misbehaves); both ends of a pair must agree, or the pair fails its set-up (the warm-up)."""
    if os.environ.get("EPD_NCCL_COALESCE", "1") == "0":
        return False
    return bool(getattr(group, "supports_coalescing", False)) and all(
        hasattr(group, name) for name in ("_start_coalescing", "_end_coalescing")
    )


@dataclass(eq=False)
class Completion:
    """One posted batch of ops (one or several keys' tensors): done() never blocks."""

    flats: list[torch.Tensor] = field(default_factory=list)  # what the ops read or write
    event: torch.cuda.Event | None = None  # nccl: recorded after the ops on the side stream
    finished: threading.Event = field(default_factory=threading.Event)  # gloo: set by the waiter
    error: str | None = None

    def done(self) -> bool:
        if self.event is not None:
            return self.event.query()
        return self.finished.is_set()


class Channel:
    """The process group of one pair, built by `Channel.connect` (blocking: run it off the loop)."""

    def __init__(self, backend: str, group: dist.Backend, rank: int, device: torch.device) -> None:
        self.backend, self.group, self.rank, self.device = backend, group, rank, device
        self.peer = CONSUMER_RANK if rank == PRODUCER_RANK else PRODUCER_RANK
        self.stream = torch.cuda.Stream(device) if backend == "nccl" else None
        self.coalesces = backend == "nccl" and can_coalesce(group)
        self._waits: queue.SimpleQueue[tuple[list, Completion] | None] | None = None
        if backend == "gloo":
            self._waits = queue.SimpleQueue()
            threading.Thread(target=self._wait_gloo, name="epd-nccl-gloo-wait", daemon=True).start()
        self._aborted = False

    @classmethod
    def connect(
        cls, backend: str, store: dist.Store, pair: str, rank: int, device: torch.device, timeout_s: float
    ) -> Channel:
        """Build the pair's group under `pair` in `store` and exchange the warm-up byte; raises if the
        peer does not come within `timeout_s`."""
        if device.type == "cuda":
            torch.cuda.set_device(device)
        group = _make_group(backend, dist.PrefixStore(f"epd/{pair}/", store), rank, timeout_s)
        channel = cls(backend, group, rank, device)
        if rank == PRODUCER_RANK:
            done = channel.post_send([torch.ones(1, dtype=torch.uint8, device=device)])
        else:
            done = channel.post_recv(_WARM_UP)[1]
        if not channel.wait(done, timeout_s):
            channel.abort()
            raise TimeoutError(f"nccl pair {pair}: the peer did not complete the warm-up in {timeout_s}s")
        return channel

    def post_send(self, tensors: list[torch.Tensor], ready: torch.cuda.Event | None = None) -> Completion:
        """Producer: one send per tensor with bytes, in order, once `ready` (the caller's stream) fired."""
        return self.post_sends([(tensors, ready)])

    def post_sends(self, batch: list[tuple[list[torch.Tensor], torch.cuda.Event | None]]) -> Completion:
        """Producer: the sends of several jobs (each its tensors and its `ready` event) as one batch,
        in order, once every job's `ready` fired; one Completion for them all."""
        with self._on_stream():
            for _, ready in batch:
                if ready is not None:
                    self.stream.wait_event(ready)
            flats = [send_view(t, self.device) for tensors, _ in batch for t in tensors if t.numel()]
            return self._post(self.group.send, flats)

    def post_recv(self, header: Header) -> tuple[dict[str, torch.Tensor], Completion]:
        """Consumer: fresh tensors for `header`'s specs, one recv per tensor with bytes, in order."""
        [tensors], completion = self.post_recvs([header])
        return tensors, completion

    def post_recvs(self, headers: list[Header]) -> tuple[list[dict[str, torch.Tensor]], Completion]:
        """Consumer: fresh tensors for each header, their recvs as one batch (the matching one of
        the producer's post_sends), in order; one Completion for them all."""
        with self._on_stream():
            batch = [
                {s.name: torch.empty(s.shape, dtype=checked_dtype(s), device=self.device) for s in h.tensors}
                for h in headers
            ]
            flats = [recv_view(t) for tensors in batch for t in tensors.values() if t.numel()]
            return batch, self._post(self.group.recv, flats)

    def _post(self, op, flats: list[torch.Tensor]) -> Completion:
        if self.coalesces and flats:
            works = self._coalesced(op, flats)
        else:
            works = [op([flat], self.peer, 0) for flat in flats]
        completion = Completion(flats=flats)  # the buffers live until the ops are done
        if self.stream is None:
            self._waits.put((works, completion))
            return completion
        for work in works:
            work.wait()  # not a host wait: the side stream waits for the NCCL stream
        completion.event = torch.cuda.Event()
        completion.event.record(self.stream)
        return completion

    def _coalesced(self, op, flats: list[torch.Tensor]) -> list:
        """`flats`' ops in one NCCL group: one Work for the lot (the ops' own are None or unused)."""
        try:
            self.group._start_coalescing()
        except (AttributeError, TypeError, NotImplementedError) as exc:
            # A torch whose binding differs: the warm-up, the first batch on both sides, finds out
            # alike on both (same torch), so both go on one op per tensor. (A RuntimeError is a
            # broken communicator: it propagates, and the pair breaks as for any failed op.)
            logger.warning("nccl pair: no coalescing (%s); one op per tensor", exc)
            self.coalesces = False
            return [op([flat], self.peer, 0) for flat in flats]
        try:
            for flat in flats:
                op([flat], self.peer, 0)
        finally:  # even after a failed op: the group must leave coalescing (an abort follows)
            work = self.group._end_coalescing()
        return [work] if work is not None else []

    def _on_stream(self):
        return torch.cuda.stream(self.stream) if self.stream is not None else contextlib.nullcontext()

    def wait(self, completion: Completion, timeout_s: float) -> bool:
        """Block until `completion` is done (True) or `timeout_s` passed (False); for set-up only."""
        if completion.event is None:
            return completion.finished.wait(timeout_s) and completion.error is None
        deadline = time.monotonic() + timeout_s
        while not completion.event.query():
            if time.monotonic() > deadline:
                return False
            time.sleep(1e-3)
        return True

    def abort(self) -> None:
        """Tear the pair down: ops still pending end (their data is garbage) and never complete ok."""
        if self._aborted:
            return
        self._aborted = True
        try:
            self.group.abort()
        except Exception as exc:  # an aborted or never-initialised communicator: nothing left to free
            logger.debug("aborting an nccl pair: %s", exc)
        if self._waits is not None:
            self._waits.put(None)

    def _wait_gloo(self) -> None:
        while (item := self._waits.get()) is not None:
            works, completion = item
            try:
                for work in works:
                    work.wait()
            except Exception as exc:  # the peer died or the pair was aborted
                completion.error = f"{type(exc).__name__}: {exc}"
            completion.finished.set()
