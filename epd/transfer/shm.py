"""Same host: CPU tensors through shared-memory files, with a small ZMQ notification per key.

    producer (send thread)                          consumer (caller thread, poll_received)
    write <shm_dir>/<prefix><n>  (pwrite)
    push ShmNotice(header, path) ---------------->  open(path); unlink(path); pread each tensor
                                                    into a fresh tensor; .to(device); close

Segment names: `epd-shm-<pid>-<8 random hex>-<counter>`, one prefix per connector (`segment_prefix`), so
a leftover file says which process made it, and one glob finds everything a connector created.

Who unlinks (each file exactly once, whoever comes first; the others ignore FileNotFoundError):
  | situation                                        | unlinked by                                 |
  |--------------------------------------------------|---------------------------------------------|
  | consumer reads the key                           | consumer, right after open() (before reading)|
  | send fails after the file was written            | producer's send thread (discard)            |
  | consumer closes with notices it never polled     | consumer's close() (best effort)            |
  | consumer crashed / never read                    | producer's close(), or its exit (finalizer) |
A producer that crashes leaves its unread files behind; their names carry its pid.

Plain pwrite/pread rather than mmap: a full /dev/shm (Docker's default is 64 MB) then fails the send
with ENOSPC instead of killing the process with SIGBUS, and reads copy straight into the tensor.
"""

from __future__ import annotations

import itertools
import os
import secrets
import tempfile
import weakref
from typing import Any

import msgspec
import torch
import zmq

from epd.transfer.base import Received
from epd.transfer.sender import SendJob
from epd.transfer.serialization import Header, TensorSpec, allocate, byte_view, decoder, encode, pack
from epd.transfer.zmq_base import ZmqConnector

SEGMENT_PREFIX = "epd-shm-"
_CHUNK = 1 << 30  # Linux moves at most ~2 GiB per read/write call


class ShmNotice(msgspec.Struct, frozen=True):
    header: Header
    path: str  # the segment; the tensors lie back to back in header order


_NOTICE = decoder(ShmNotice)


def default_shm_dir() -> str:
    """/dev/shm where it exists (RAM-backed), else the temp dir (still correct, maybe disk-backed)."""
    return "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()


class ShmConnector(ZmqConnector):
    """Address: the notification socket, `tcp://<host>:<port>`; options: send_timeout_s, shm_dir (both
    sides must use the same one; the consumer only reads and unlinks segment files inside its own)."""

    name = "shm"

    def __init__(
        self,
        *,
        device: str | torch.device = "cpu",
        host: str = "127.0.0.1",
        send_timeout_s: float = 30.0,
        shm_dir: str | None = None,
    ) -> None:
        super().__init__(device=device, host=host, send_timeout_s=send_timeout_s)
        self.shm_dir = os.path.abspath(shm_dir or default_shm_dir())  # producer and consumer: the same
        self.segment_prefix = f"{SEGMENT_PREFIX}{os.getpid()}-{secrets.token_hex(4)}-"
        self._counter = itertools.count()  # used by the send thread only
        # Reclaims this connector's unread segments at close(), or at interpreter exit if never closed.
        self._reclaim = weakref.finalize(self, unlink_segments, self.shm_dir, self.segment_prefix)

    def close(self) -> None:
        super().close()
        self._reclaim()

    def _encode(self, job: SendJob) -> list[Any]:
        specs, buffers = pack(job.tensors)
        job.state = os.path.join(self.shm_dir, f"{self.segment_prefix}{next(self._counter)}")
        write_segment(job.state, buffers)
        return [encode(ShmNotice(Header(job.key, job.sent_at, job.meta, specs), job.state))]

    def _discard(self, job: SendJob) -> None:
        if job.state is not None:
            _unlink_quietly(job.state)

    def _receive(self, frames: list[zmq.Frame]) -> Received:
        notice = _NOTICE.decode(frames[0].buffer)
        header = notice.header
        self._check_segment_path(notice.path)
        tensors = read_segment(notice.path, header.tensors)
        on_device = {spec.name: t.to(self.device) for spec, t in zip(header.tensors, tensors)}
        return Received(header.key, on_device, header.meta, header.nbytes, header.sent_at)

    def _check_segment_path(self, path: str) -> None:
        # The consumer unlinks what it reads: never let a notice name a file that is not a segment.
        directory, name = os.path.split(path)
        if directory != self.shm_dir or not name.startswith(SEGMENT_PREFIX):
            raise ValueError(f"notice names {path!r}, not a segment in {self.shm_dir}")

    def _drop_unread(self) -> None:
        while True:
            try:
                frames = self._pull.recv_multipart(zmq.NOBLOCK, copy=False)
            except zmq.Again:
                return
            try:
                path = _NOTICE.decode(frames[0].buffer).path
                self._check_segment_path(path)
                _unlink_quietly(path)
            except (msgspec.DecodeError, msgspec.ValidationError, ValueError):
                pass


def write_segment(path: str, buffers: list[memoryview]) -> None:
    """Create `path` (must not exist) holding the buffers back to back; on any error, leave no file."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        offset = 0
        for buffer in buffers:
            view = memoryview(buffer).cast("B")
            for start in range(0, len(view), _CHUNK):
                _pwrite_all(fd, view[start : start + _CHUNK], offset + start)
            offset += len(view)
    except BaseException:
        _unlink_quietly(path)
        raise
    finally:
        os.close(fd)


def read_segment(path: str, specs: tuple[TensorSpec, ...]) -> list[torch.Tensor]:
    """CPU tensors read from the segment at `path`, which is unlinked first (the open fd keeps the data)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.unlink(path)  # now, not after reading: a crash while reading then leaks nothing
        expected = sum(spec.nbytes for spec in specs)
        if os.fstat(fd).st_size != expected:
            raise ValueError(f"segment {path} holds {os.fstat(fd).st_size} bytes, its notice says {expected}")
        tensors, offset = [], 0
        for spec in specs:
            tensor = allocate(spec)
            if spec.nbytes:
                _pread_all(fd, byte_view(tensor), offset)
            tensors.append(tensor)
            offset += spec.nbytes
        return tensors
    finally:
        os.close(fd)


def unlink_segments(shm_dir: str, prefix: str) -> int:
    """Unlink every file in `shm_dir` whose name starts with `prefix`; returns how many went."""
    removed = 0
    for name in os.listdir(shm_dir):
        if name.startswith(prefix) and _unlink_quietly(os.path.join(shm_dir, name)):
            removed += 1
    return removed


def _pwrite_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        done += os.pwrite(fd, view[done:], offset + done)


def _pread_all(fd: int, view: memoryview, offset: int) -> None:
    done = 0
    while done < len(view):
        n = os.preadv(fd, [view[done : done + _CHUNK]], offset + done)
        if n == 0:
            raise ValueError(f"shared-memory segment ended {len(view) - done} bytes early")
        done += n


def _unlink_quietly(path: str) -> bool:
    try:
        os.unlink(path)
        return True
    except FileNotFoundError:
        return False
