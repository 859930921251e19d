"""How rank 0's commands reach its workers: pickled into a shared-memory ring (epd.parallel.ring),
written once whatever the number of workers, read by each.

Why not gloo's `broadcast_object_list` (what sent them first): two gloo broadcasts per command
(the size, then the bytes), 0.4-0.8 ms per decode step with two ranks on the H200 host, of a
~4.5 ms step: alone enough to keep tp2 decode above 0.65x tp1. Here a batch-1 decode step costs
rank 0 ~11 us (6 to pickle, 5 to write and read it, measured in one process) and one write
whatever the number of workers; a spinning worker sees it without a wake-up.
`python -m epd.bench.tp_commands` prints both paths side by side.

Set up once per group, inside `TensorParallelGroup.join` (so through the instance's existing
rendezvous, `InstanceConfig.tp_init_method`): rank 0 listens on an abstract Unix socket of a
random name and broadcasts that name over the gloo side group; each worker connects and says its
rank; rank 0 answers with the ring's layout and its memory (a memfd passed over the socket, so no
name in /dev/shm to leak when a process is killed). Each connection then stays as that worker's
doorbell (wake-ups, and deaths: end of file).

Serialization: pickle protocol 5, host tensors as raw bytes (`_Pickler`): torch's own pickling
of a tensor goes through `torch.save` and was the larger part of an 8k-token prefill's command.
msgspec was measured too: no faster to decode (building the Python ints of the lists dominates),
faster to encode only for the long lists of a prefill, and it would need a schema per command.
"""

from __future__ import annotations

import io
import mmap
import os
import pickle
import socket
import struct
import uuid
from collections.abc import Callable

import torch

from epd.parallel.ring import ChannelClosed, RingLayout, RingReader, RingWriter

__all__ = ["ChannelClosed", "CommandReceiver", "CommandSender", "open_channel"]

# A reader spins this long for the next command before it sleeps on its doorbell: longer than
# the gap between two decode steps (the worker's forward returns as soon as its kernels are
# queued), so in steady decoding no command waits for a wake-up.
SPIN_S = 0.05
SLOTS = 8
SLOT_BYTES = 1 << 20  # an 8k-token prefill step pickles to ~0.2 MB: one slot
ACCEPT_TIMEOUT_S = 1800.0  # every worker has joined the group already: this only bounds a crash
_LAYOUT = struct.Struct("<QQQ")
_RANK = struct.Struct("<Q")


class CommandSender:
    """Rank 0's end: `send` each command once, every worker gets it."""

    def __init__(self, writer: RingWriter, memory: mmap.mmap) -> None:
        self.writer, self._memory = writer, memory

    def send(self, command: object) -> None:
        self.writer.write(dumps(command))

    def close(self) -> None:
        self.writer.close()
        _unmap(self.writer.buf, self._memory)


class CommandReceiver:
    """A worker's end: `receive` blocks for the next command (raises `ChannelClosed` when rank 0
    is gone)."""

    def __init__(self, reader: RingReader, memory: mmap.mmap) -> None:
        self.reader, self._memory = reader, memory

    def receive(self) -> object:
        return pickle.loads(self.reader.read())

    def close(self) -> None:
        self.reader.close()
        _unmap(self.reader.buf, self._memory)


def open_channel(
    rank: int,
    world_size: int,
    share: Callable[[object], object],
    spin_s: float = SPIN_S,
    layout: RingLayout | None = None,
) -> CommandSender | CommandReceiver:
    """Every rank of the group calls this together. `share(x)`: rank 0's `x` on every rank (a
    broadcast over the group; the others pass None). `layout` matters on rank 0 only."""
    if rank == 0:
        layout = layout or RingLayout(world_size - 1, SLOTS, SLOT_BYTES)
        return _serve_ring(layout, share, spin_s)
    return _join_ring(rank, share(None), spin_s)


def _serve_ring(layout: RingLayout, share: Callable[[object], object], spin_s: float) -> CommandSender:
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    fd = os.memfd_create("epd-tp-commands")
    try:
        address = f"\0epd-tp-{uuid.uuid4().hex}"  # abstract: nothing on disk to clean up
        listener.bind(address)
        listener.listen(layout.readers)
        listener.settimeout(ACCEPT_TIMEOUT_S)
        share(address)
        os.ftruncate(fd, layout.size)
        memory = mmap.mmap(fd, layout.size)
        bells: list[socket.socket | None] = [None] * layout.readers
        for _ in range(layout.readers):
            bell, _ = listener.accept()
            bell.settimeout(None)
            rank = _RANK.unpack(_receive_exactly(bell, _RANK.size))[0]
            socket.send_fds(bell, [_LAYOUT.pack(layout.readers, layout.slots, layout.slot_bytes)], [fd])
            bells[rank - 1] = bell
    finally:
        listener.close()
        os.close(fd)  # the mappings keep the memory; it goes with the last of them
    return CommandSender(RingWriter(memoryview(memory), layout, bells, spin_s), memory)


def _join_ring(rank: int, address: object, spin_s: float) -> CommandReceiver:
    bell = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    bell.connect(address)
    bell.sendall(_RANK.pack(rank))
    message, fds, _, _ = socket.recv_fds(bell, _LAYOUT.size, 1)
    if len(message) != _LAYOUT.size or len(fds) != 1:
        raise ChannelClosed(f"tensor-parallel rank {rank}: rank 0 ended while the command ring was set up")
    layout = RingLayout(*_LAYOUT.unpack(message))
    try:
        memory = mmap.mmap(fds[0], layout.size)
    finally:
        os.close(fds[0])
    return CommandReceiver(RingReader(memoryview(memory), layout, rank - 1, bell, spin_s), memory)


def _receive_exactly(sock: socket.socket, size: int) -> bytes:
    data = b""
    while len(data) < size:
        more = sock.recv(size - len(data))
        if not more:
            raise ChannelClosed("a tensor-parallel worker ended while the command ring was set up")
        data += more
    return data


def _unmap(view: memoryview, memory: mmap.mmap) -> None:
    view.release()
    memory.close()


# ---- serialization ---------------------------------------------------------------------------


class _Pickler(pickle.Pickler):
    def reducer_override(self, obj: object) -> object:
        if type(obj) is torch.Tensor and obj.device.type == "cpu":
            flat = obj.detach().contiguous().reshape(-1)
            return _tensor, (flat.view(torch.uint8).numpy().tobytes(), flat.dtype, tuple(obj.shape))
        return NotImplemented


def dumps(command: object) -> bytes:
    out = io.BytesIO()
    _Pickler(out, protocol=5).dump(command)
    return out.getvalue()


def _tensor(data: bytes, dtype: torch.dtype, shape: tuple[int, ...]) -> torch.Tensor:
    if not data:
        return torch.empty(shape, dtype=dtype)
    return torch.frombuffer(bytearray(data), dtype=dtype).view(shape)
