"""Any host: bytes over ZMQ PUSH -> PULL sockets, the universal fallback.

A message is [msgpack Header, raw bytes of tensor 0, raw bytes of tensor 1, ...]. Sends are zero-copy
for CPU tensors that are already contiguous (ZMQ reads the caller's memory; the SendResult comes once
ZMQ has released it). Receives are zero-copy for large frames too: ZMQ gives each large message part a
buffer of its own, which the received tensor adopts (and keeps alive); small or misaligned parts are
copied into a fresh tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import zmq

from epd.transfer.base import Received
from epd.transfer.sender import SendJob
from epd.transfer.serialization import Header, TensorSpec, checked_dtype, decoder, encode, pack, unpack
from epd.transfer.zmq_base import ZmqConnector

_HEADER = decoder(Header)
# Parts below ZMQ's input batch size (8 KiB by default) may share one decode buffer with other messages:
# only parts well above it own their memory and may be adopted. Below this size the copy is cheap anyway.
_ADOPT_MIN_BYTES = 1 << 20


class TcpConnector(ZmqConnector):
    """Address `tcp://<host>:<port>`, bound on `host` at a free port; options: send_timeout_s."""

    name = "tcp"

    def _encode(self, job: SendJob) -> list[Any]:
        specs, buffers = pack(job.tensors)
        return [encode(Header(job.key, job.sent_at, job.meta, specs)), *buffers]

    def _receive(self, frames: list[zmq.Frame]) -> Received:
        header = _HEADER.decode(frames[0].buffer)
        if len(frames) != len(header.tensors) + 1:
            raise ValueError(f"{len(frames) - 1} tensor frames for {len(header.tensors)} tensors")
        tensors = {spec.name: _frame_tensor(spec, frame) for spec, frame in zip(header.tensors, frames[1:])}
        on_device = {name: tensor.to(self.device) for name, tensor in tensors.items()}
        return Received(header.key, on_device, header.meta, header.nbytes, header.sent_at)


def _frame_tensor(spec: TensorSpec, frame: zmq.Frame) -> torch.Tensor:
    """The tensor of `spec` over `frame`'s memory (no copy) where that is safe, else copied out."""
    dtype = checked_dtype(spec)
    if spec.nbytes >= _ADOPT_MIN_BYTES and len(frame) == spec.nbytes:
        flat = torch.frombuffer(frame, dtype=torch.uint8)  # a Frame's own buffer is writable; kept alive
        if flat.data_ptr() % torch.empty((), dtype=dtype).element_size() == 0:
            return flat.view(dtype).reshape(spec.shape)
    return unpack((spec,), [frame.buffer])[spec.name]
