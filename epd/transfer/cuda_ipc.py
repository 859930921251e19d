"""Same host, GPU to GPU: payloads move device to device through CUDA IPC, never touching the host.

    producer (send thread)                                  consumer (caller thread)
    wait for the send's ready event (caller's stream)
    copy the tensors into a region of the staging buffer
      (one preallocated allocation, side stream), sync
    push IpcNotice(header, handle, offsets) ------------->  open the producer's staging buffer (once
                                                            per producer: the handle is cached),
                                                            cuMemcpyDtoDAsync each tensor into a fresh
                                                            tensor on a side stream; the caller's stream
                                                            waits on it (no host sync), Received now
    region freed                       <-- IpcAck(region) -- ack thread: waits for the copy, acks

Why a staging buffer, not the caller's own tensors: an IPC handle names a whole allocation, and
opening one costs far more than a copy; one buffer per producer is exported once and opened once by
each consumer, whatever the caller sends (gathered KV, embeddings, a CPU generator state). The extra
copy runs at local HBM speed, several times the NVLink rate of the copy that follows.

Ordering and completion follow the Connector contract: notices travel on the same ZMQ PUSH -> PULL
path as shm's (FIFO per pair); a send is ok once its bytes are in the staging buffer and its notice is
with ZMQ. The staging region lives on until the consumer's ack; if the buffer is full, the send thread
waits for acks up to send_timeout_s, then fails the send. A consumer that dies before acking leaks its
regions until the producer closes.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
from dataclasses import dataclass
from typing import Any

import msgspec
import torch
import zmq

from epd.transfer import cuda_driver
from epd.transfer.base import Received
from epd.transfer.sender import SendJob
from epd.transfer.serialization import Header, TensorSpec, checked_dtype, encode, spec_of
from epd.transfer.staging import Regions, align_up
from epd.transfer.zmq_base import ZmqConnector

logger = logging.getLogger(__name__)

DEFAULT_STAGING_BYTES = 1 << 30


class IpcNotice(msgspec.Struct, tag="notice", frozen=True):
    header: Header
    handle: bytes  # IPC handle of the producer's staging allocation
    offsets: tuple[int, ...]  # where each tensor's bytes start, from the allocation's base
    pid: int  # the producer's: a consumer in the same process cannot open its own handle
    reply_to: str  # the producer's address, for the ack
    region: int  # the staging region to free on ack


class IpcAck(msgspec.Struct, tag="ack", frozen=True):
    region: int


_MESSAGE = msgspec.msgpack.Decoder(IpcNotice | IpcAck)

# Staging allocations of this process by handle: a consumer here reads them directly.
_OWN_BUFFERS: dict[bytes, int] = {}


@dataclass
class _Staging:
    """A send's progress: where its bytes go in the staging buffer, and the event after which they are
    there (None until the copy is issued)."""

    ready: torch.cuda.Event  # the caller's tensors hold their values once this fires
    region: int | None = None
    offsets: list[int] | None = None
    copied: torch.cuda.Event | None = None


class CudaIpcConnector(ZmqConnector):
    """Address: the notice socket, `tcp://<host>:<port>`; `device` must be a CUDA device. Options:
    send_timeout_s, staging_bytes (the producer's staging buffer, allocated at its first send)."""

    name = "cuda_ipc"

    def __init__(
        self,
        *,
        device: str | torch.device = "cuda",
        host: str = "127.0.0.1",
        send_timeout_s: float = 30.0,
        staging_bytes: int = DEFAULT_STAGING_BYTES,
    ) -> None:
        device = torch.device(device)
        if device.type != "cuda":
            raise ValueError(f"cuda_ipc moves tensors between CUDA devices, not from/to {device}")
        index = device.index if device.index is not None else torch.cuda.current_device()
        device = torch.device("cuda", index)
        super().__init__(device=device, host=host, send_timeout_s=send_timeout_s)
        torch.cuda.set_device(self.device)  # an instance serves one device: make it this thread's too
        cuda_driver.ensure_context(self.device.index)
        self._regions = Regions(staging_bytes)
        self._staging: torch.Tensor | None = None  # created at the first send: consumers need none
        self._staging_lock = threading.Lock()
        self._handle, self._handle_offset = b"", 0
        self._copy_stream: torch.cuda.Stream | None = None  # send thread: into the staging buffer
        self._recv_stream = torch.cuda.Stream(self.device)  # caller thread: out of peers' buffers
        self._peers: dict[bytes, int] = {}  # opened peer handle -> base address in this context
        self._acks = _AckSender()

    # ---- producer side ----
    def _check_tensors(self, tensors: dict[str, torch.Tensor]) -> None:
        for name, tensor in tensors.items():
            if tensor.device.type != "cpu" and tensor.device != self.device:
                raise TypeError(f"tensor {name!r} is on {tensor.device}; this connector is on {self.device}")

    def _prepare(self, job: SendJob) -> None:
        stream = torch.cuda.current_stream(self.device)
        ready = torch.cuda.Event()
        ready.record(stream)  # the tensors' values exist once it fires
        job.state = _Staging(ready)
        # The common case, a free region: copy now, on the caller's stream (ordered after whatever
        # computed the tensors, no thread hop). Otherwise the send thread waits for one.
        sizes = _region_sizes(job.tensors)
        region = (
            self._regions.allocate(sum(sizes), timeout=0) if sum(sizes) <= self._regions.capacity else None
        )
        if region is not None:
            self._stage(job, region, sizes, stream)

    def _stage(self, job: SendJob, region: int, sizes: list[int], stream: torch.cuda.Stream) -> None:
        """Issue the copies of `job`'s tensors into `region` on `stream`; record when they are done."""
        staging = self._ensure_staging()
        job.state.region = region
        job.state.offsets = [region + sum(sizes[:i]) for i in range(len(sizes))]
        with torch.cuda.stream(stream):
            for offset, tensor in zip(job.state.offsets, job.tensors.values()):
                _copy_into(staging, offset, tensor)
        job.state.copied = torch.cuda.Event()
        job.state.copied.record(stream)

    def _encode(self, job: SendJob) -> list[Any]:
        state = job.state
        if state.copied is None:  # no region was free at send(): wait for acks, copy on a side stream
            sizes = _region_sizes(job.tensors)
            region = self._regions.allocate(sum(sizes), self._send_timeout_s)
            if region is None:
                raise RuntimeError(f"staging buffer full for {self._send_timeout_s}s (consumers slow to ack)")
            torch.cuda.set_device(self.device)  # this runs on the send thread
            self._ensure_staging()
            self._copy_stream.wait_event(state.ready)
            self._stage(job, region, sizes, self._copy_stream)
        state.copied.synchronize()  # spins: the notice must not overtake the bytes, and waking is slow
        specs = tuple(spec_of(name, t) for name, t in job.tensors.items())
        job.tensors = {}  # the caller's tensors are no longer needed: let them go now
        header = Header(job.key, job.sent_at, job.meta, specs)
        offsets = tuple(self._handle_offset + o for o in state.offsets)
        notice = IpcNotice(header, self._handle, offsets, os.getpid(), self.address, state.region)
        return [encode(notice)]

    def _ensure_staging(self) -> torch.Tensor:
        # The driver calls act on the current context: make it this connector's device's, whatever
        # the calling thread had (one process may hold connectors on several devices: tests, benches).
        # Never an inference tensor: the first send may come from inside inference_mode (a KV layer
        # streamed from the forward) and a later one from outside it (a seeded request's hand-off),
        # and an in-place copy into an inference tensor outside inference_mode is an error.
        with self._staging_lock, torch.cuda.device(self.device), torch.inference_mode(False):
            if self._staging is None:
                staging = torch.empty(self._regions.capacity, dtype=torch.uint8, device=self.device)
                self._handle, self._handle_offset = cuda_driver.export_allocation(staging.data_ptr())
                _OWN_BUFFERS[self._handle] = staging.data_ptr() - self._handle_offset
                self._copy_stream = torch.cuda.Stream(self.device)
                self._staging = staging
            return self._staging

    def _discard(self, job: SendJob) -> None:
        if isinstance(job.state, _Staging) and job.state.region is not None:
            self._regions.free(job.state.region)

    # ---- consumer side ----
    def _receive(self, frames: list[zmq.Frame]) -> Received | None:
        message = _MESSAGE.decode(frames[0].buffer)
        if isinstance(message, IpcAck):  # a consumer finished copying one of our sends
            if not self._regions.free(message.region):
                logger.warning("cuda_ipc ack for unknown staging region %d", message.region)
            return None
        with torch.cuda.device(self.device):  # peer mappings and copies belong to this device's context
            return self._land(message)

    def _land(self, notice: IpcNotice) -> Received:
        """Start copying the notice's tensors here; the caller's stream waits for them."""
        header = notice.header
        if len(notice.offsets) != len(header.tensors):
            raise ValueError(f"{len(notice.offsets)} offsets for {len(header.tensors)} tensors")
        base = self._peer_base(notice)
        current = torch.cuda.current_stream(self.device)
        self._recv_stream.wait_stream(current)  # fresh tensors may reuse memory the current stream used
        tensors = {s.name: self._empty(s) for s in header.tensors}
        started = torch.cuda.Event(enable_timing=True)  # after the allocations: times the copies alone
        started.record(self._recv_stream)
        stream = self._recv_stream.cuda_stream
        for spec, offset in zip(header.tensors, notice.offsets):
            if spec.nbytes:
                cuda_driver.copy_async(tensors[spec.name].data_ptr(), base + offset, spec.nbytes, stream)
        landed = torch.cuda.Event(enable_timing=True, blocking=True)  # the ack thread sleeps on it
        landed.record(self._recv_stream)
        current.wait_event(landed)  # every later use on the caller's stream sees the bytes
        self._acks.submit(_Landing(started, landed, header.nbytes, notice.reply_to, notice.region))
        return Received(header.key, tensors, header.meta, header.nbytes, header.sent_at)

    def _empty(self, spec: TensorSpec) -> torch.Tensor:
        return torch.empty(spec.shape, dtype=checked_dtype(spec), device=self.device)

    def copy_stats(self) -> tuple[int, float]:
        """(bytes, device seconds) of the copies out of peers' staging buffers that have landed."""
        return self._acks.copied_bytes, self._acks.copy_seconds

    def _peer_base(self, notice: IpcNotice) -> int:
        if notice.pid == os.getpid():
            base = _OWN_BUFFERS.get(notice.handle)
            if base is None:
                raise ValueError("notice names a staging buffer this process does not hold")
            return base
        base = self._peers.get(notice.handle)
        if base is None:
            base = cuda_driver.open_allocation(notice.handle)
            self._peers[notice.handle] = base
        return base

    def close(self) -> None:
        if self._closed:
            return
        super().close()
        self._recv_stream.synchronize()  # no copy may still read a mapping about to be closed
        self._acks.close()
        for base in self._peers.values():
            try:
                cuda_driver.close_allocation(base)
            except cuda_driver.CudaDriverError as exc:
                logger.warning("closing a peer staging buffer: %s", exc)
        self._peers.clear()
        _OWN_BUFFERS.pop(self._handle, None)
        self._staging = None


@dataclass
class _Landing:
    started: torch.cuda.Event
    landed: torch.cuda.Event
    nbytes: int
    reply_to: str
    region: int


class _AckSender:
    """Acks each landed copy to its producer once the copy is done, off the caller's thread (an idle
    instance polls rarely, and the producer's staging region should come back promptly). Also sums
    the copies' device time: bytes / seconds is the bandwidth the pulls achieved on the GPU."""

    def __init__(self) -> None:
        self._jobs: queue.SimpleQueue[_Landing | None] = queue.SimpleQueue()
        self.copied_bytes, self.copy_seconds = 0, 0.0
        self._thread = threading.Thread(target=self._run, name="epd-cuda_ipc-ack", daemon=True)
        self._thread.start()

    def submit(self, landing: _Landing) -> None:
        self._jobs.put(landing)

    def close(self) -> None:
        self._jobs.put(None)
        self._thread.join(10)

    def _run(self) -> None:
        sockets: dict[str, zmq.Socket] = {}
        try:
            while (job := self._jobs.get()) is not None:
                job.landed.synchronize()
                self.copy_seconds += job.started.elapsed_time(job.landed) / 1e3
                self.copied_bytes += job.nbytes
                sock = sockets.get(job.reply_to)
                if sock is None:
                    sock = sockets[job.reply_to] = zmq.Context.instance().socket(zmq.PUSH)
                    sock.connect(job.reply_to)
                sock.send(encode(IpcAck(job.region)))
        finally:
            for sock in sockets.values():
                sock.close(linger=100)


def _region_sizes(tensors: dict[str, torch.Tensor]) -> list[int]:
    return [align_up(t.numel() * t.element_size()) for t in tensors.values()]


def _copy_into(staging: torch.Tensor, offset: int, tensor: torch.Tensor) -> None:
    nbytes = tensor.numel() * tensor.element_size()
    if nbytes == 0:
        return
    source = tensor.detach().resolve_conj().resolve_neg().contiguous().reshape(-1).view(torch.uint8)
    staging[offset : offset + nbytes].copy_(source, non_blocking=True)
