"""GPU to GPU on any hosts: payloads move through NCCL point-to-point ops, one communicator per pair.

    producer (send thread)                                 consumer (receive thread)
    first send to a dest: Hello(pair id) ----------------> set-up thread: group on its own store
    set-up thread: group on the dest's store  <-- rendezvous (TCPStore) -->  under the pair's id,
      warm-up byte                            <---------------------------->  warm-up byte
    the sends queued for a dest:                          per notice: fresh tensors, one recv
      Notice(pair, their headers) ----------------------> per tensor as one batch (side stream);
      one send per tensor as one batch  ======>           delivered once done, in notice order
      (side stream, after the callers' streams)  NCCL
    ok once their sends are done on the device

A batch is what queued up for the pair while the previous one was being posted (none waits to fill
one); on NCCL it is one coalesced group with one CUDA event, so the per-message costs (notice, ZMQ
push, NCCL Work, events) are paid once per batch.

nccl_channel.py has the pair (address, rendezvous, ops), nccl_send.py and nccl_recv.py the two
threads. The Connector contract holds as for the other backends: FIFO per pair (one communicator
per ordered pair, ops matched by order), completion once the caller's tensors were read (sends
done on the device, so the caller may write into them again), close, and a peer that dies fails
its own pair's keys only (a deadline per op; the pair's group is aborted, the next send to that
dest builds a new one). `backend="gloo"` runs the same logic over host memory: CPU tests, and
any host without NCCL.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import torch
import torch.distributed as dist
import zmq

from epd.transfer.base import Connector, ConnectorClosedError, Received, SendResult, check_send_args
from epd.transfer.nccl_channel import BACKENDS, PeerAddress, serve_store
from epd.transfer.nccl_recv import NcclRecvLoop
from epd.transfer.nccl_send import NcclSendLoop
from epd.transfer.sender import SendJob
from epd.transfer.serialization import check_meta


class NcclConnector(Connector):
    """Address `nccl://host:notice_port/store_port`. Options: send_timeout_s (what set-up, one op
    or one notice may take before the pair is given up), backend ("nccl", or "gloo" on any device)."""

    name = "nccl"

    def __init__(
        self,
        *,
        device: str | torch.device = "cuda",
        host: str = "127.0.0.1",
        send_timeout_s: float = 30.0,
        backend: str = "nccl",
    ) -> None:
        self.device = _checked_device(torch.device(device), backend)
        self.backend = backend
        # Where the ops read and write: the GPU for nccl, host memory for gloo.
        self.transport = self.device if backend == "nccl" else torch.device("cpu")
        self._timeout = send_timeout_s
        self._store = serve_store(host, send_timeout_s)
        pull = zmq.Context.instance().socket(zmq.PULL)
        pull.setsockopt(zmq.LINGER, 0)
        port = pull.bind_to_random_port(f"tcp://{host}")
        self._address = str(PeerAddress(host, port, self._store.port))
        self._receiver = NcclRecvLoop(pull, self._store, backend, self.transport, send_timeout_s)
        self._sender: NcclSendLoop | None = None  # the first send() starts it: consumers need none
        self._lock = threading.Lock()
        self._closed = False

    @property
    def address(self) -> str:
        return self._address

    # ---- producer side ----
    def send(
        self, dest: str, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any] | None = None
    ) -> None:
        check_send_args(key, tensors, meta)
        for name, tensor in tensors.items():
            if self.backend == "nccl" and tensor.device.type != "cpu" and tensor.device != self.device:
                raise TypeError(f"tensor {name!r} is on {tensor.device}; this connector is on {self.device}")
        meta = check_meta(meta)
        nbytes = sum(t.numel() * t.element_size() for t in tensors.values())
        job = SendJob(dest, key, dict(tensors), meta, nbytes, time.time(), time.perf_counter())
        job.state = self._ready_event(tensors)
        self._ensure_sender().submit(job)

    def _ready_event(self, tensors: dict[str, torch.Tensor]) -> torch.cuda.Event | None:
        """Where the caller's stream stands now: the sends wait for it (the tensors' values exist)."""
        if self.transport.type != "cuda" or not any(t.is_cuda for t in tensors.values()):
            return None
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    def _ensure_sender(self) -> NcclSendLoop:
        with self._lock:
            if self._closed:
                raise ConnectorClosedError(f"send on a closed nccl connector ({self._address})")
            if self._sender is None:
                self._sender = NcclSendLoop(self.backend, self.transport, self._timeout)
            return self._sender

    def poll_sent(self) -> list[SendResult]:
        if self._closed or self._sender is None:
            return []
        return self._sender.results()

    # ---- consumer side ----
    def poll_received(self) -> list[Received]:
        if self._closed:
            return []
        items = self._receiver.take()
        for item in items:
            item.tensors = {name: self._place(tensor) for name, tensor in item.tensors.items()}
        return items

    def _place(self, tensor: torch.Tensor) -> torch.Tensor:
        if tensor.device != self.device:
            return tensor.to(self.device)
        if tensor.is_cuda:  # allocated on the receive stream; the caller's frees it on its own
            tensor.record_stream(torch.cuda.current_stream(self.device))
        return tensor

    def pollables(self) -> list[Any]:
        return [] if self._closed else [self._receiver.pollable]

    def close(self) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
        if self._sender is not None:
            self._sender.close()
        self._receiver.close()
        self._store = None  # the store's server stops with its last reference


def _checked_device(device: torch.device, backend: str) -> torch.device:
    if backend not in BACKENDS:
        raise ValueError(f"nccl connector backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    if backend == "gloo":
        if not dist.is_available() or not dist.is_gloo_available():
            raise RuntimeError("this torch build has no gloo backend")
        return device
    if device.type != "cuda":
        raise ValueError(
            f"nccl moves tensors between CUDA devices, not from/to {device} (backend='gloo' does)"
        )
    if not dist.is_nccl_available():
        raise RuntimeError("this torch build has no NCCL (a CPU-only wheel?)")
    index = device.index if device.index is not None else torch.cuda.current_device()
    return torch.device("cuda", index)


class GlooConnector(NcclConnector):
    """The nccl connector's pairs over gloo (host memory, any device): `transfer="gloo"` runs the
    same pairing, ordering and failure logic as nccl on CPUs (CI), and between hosts without NCCL."""

    name = "gloo"

    def __init__(self, **options: Any) -> None:
        super().__init__(**{**options, "backend": "gloo"})
