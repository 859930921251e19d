"""A ring of message slots in shared memory: one writer (rank 0), n readers (its workers), every
message read by every reader, in order. What `epd.parallel.channel` sends commands through.

Hot path: a decode step's command crosses it every few milliseconds; keep it free of allocations
beyond the message itself and of system calls while readers keep up (one `poll` per message, to
notice a dead reader).

Memory (all integers little-endian u64; each writer/reader field on its own cache line, so a
reader spinning on its line does not bounce the writer's):

| where                         | what                                                          |
|-------------------------------|---------------------------------------------------------------|
| line 0                        | `waiting`: the writer sleeps until a reader frees a slot      |
| line 1 + i (reader i)         | `done`: the last sequence number reader i finished copying;   |
|                               | `sleeping`: reader i sleeps on its doorbell                   |
| slot k (after the lines)      | `seq`, `length`, `last` (1: the message's final chunk), data  |

Message sequence numbers start at 1; chunk `seq` lives in slot `seq % slots`. A message larger
than a slot goes as consecutive chunks. The writer reuses a slot only once every reader's `done`
reached the chunk it held (`seq - slots`). A slot's `seq` is written after its data, so a reader
that sees the `seq` it expects reads complete data.

Waiting without polling on a timer: a reader spins on the slot for `spin_s` (the next decode step
usually comes within that: no system call, no wake-up latency), then sleeps in `recv` on its
doorbell, a Unix socket to the writer, as on a futex: it sets `sleeping`, fences, looks once more,
then blocks; the writer, after publishing, fences and rings every reader whose `sleeping` is set.
With a fence on each side between the store and the load, one of the two sees the other's store:
no lost wake-up (a spurious one only costs a look). The writer waits for a full ring the same way
(`waiting`, then `select` on the lagging readers' doorbells).

The doorbells also carry deaths: a reader whose writer died gets end of file in `recv`; the
writer checks its doorbells before each message (one `poll`, no wait) and sees end of file on a
dead reader's. Either raises `ChannelClosed` instead of waiting for ever.
"""

from __future__ import annotations

import os
import select
import socket
import struct
import threading
import time
from dataclasses import dataclass

LINE = 64  # bytes: one cache line per field group
_U64 = struct.Struct("<Q")
_SLOT_HEAD = struct.Struct("<QQQ")  # seq, length, last
_SIZE_AND_LAST = struct.Struct("<QQ")  # the slot head past its seq
WAITING_AT = 0  # the writer's `waiting`, line 0
_RING = b"\x01"  # a doorbell's byte (its value means nothing)
_DRAIN = 4096

_FENCE = threading.Lock()


def fence() -> None:
    """A full memory barrier: the lock's atomic read-modify-write (a `lock`-prefixed instruction
    on x86-64, which orders every store before it against every load after it: what `sleeping` /
    `seq` and `waiting` / `done` rely on). Elsewhere (aarch64) only as strong as the C library's
    semaphore; not tried there."""
    _FENCE.acquire()
    _FENCE.release()


class ChannelClosed(ConnectionError):
    """The other end of the ring is gone (its process ended)."""


@dataclass(frozen=True)
class RingLayout:
    readers: int
    slots: int
    slot_bytes: int  # data bytes per slot, after the slot's head

    @property
    def size(self) -> int:
        return self._slots_start + self.slots * self._slot_stride

    def done_at(self, reader: int) -> int:
        return (1 + reader) * LINE

    def sleeping_at(self, reader: int) -> int:
        return (1 + reader) * LINE + 8

    def slot_at(self, seq: int) -> int:
        return self._slots_start + (seq % self.slots) * self._slot_stride

    @property
    def _slots_start(self) -> int:
        return (1 + self.readers) * LINE

    @property
    def _slot_stride(self) -> int:
        return -(-(_SLOT_HEAD.size + self.slot_bytes) // LINE) * LINE


class RingWriter:
    def __init__(
        self, buf: memoryview, layout: RingLayout, bells: list[socket.socket], spin_s: float
    ) -> None:
        """`bells[i]`: the doorbell of reader i (a connected Unix socket)."""
        self.buf, self.layout, self.bells, self.spin_s = buf, layout, bells, spin_s
        self.seq = 0
        self._poll = select.poll()
        for bell in bells:
            self._poll.register(bell, select.POLLIN)
        self._reader_of = {bell.fileno(): i for i, bell in enumerate(bells)}

    def write(self, message: bytes | bytearray | memoryview) -> None:
        """Publish `message` to every reader; returns once it is in the ring (not once read)."""
        self._check_readers()
        view, step = memoryview(message), self.layout.slot_bytes
        starts = range(0, len(view), step) if len(view) else [0]
        for start in starts:
            self._put(view[start : start + step], last=start + step >= len(view))

    def _put(self, chunk: memoryview, last: bool) -> None:
        seq = self.seq + 1
        self._wait_for_slot(seq)
        at = self.layout.slot_at(seq)
        data = at + _SLOT_HEAD.size
        self.buf[data : data + len(chunk)] = chunk
        _SIZE_AND_LAST.pack_into(self.buf, at + _U64.size, len(chunk), int(last))
        fence()  # data and length before seq
        _U64.pack_into(self.buf, at, seq)
        self.seq = seq
        fence()  # seq before reading `sleeping` (the readers' half is in `RingReader._sleep`)
        for reader, bell in enumerate(self.bells):
            if _U64.unpack_from(self.buf, self.layout.sleeping_at(reader))[0]:
                _ring(bell)

    def _wait_for_slot(self, seq: int) -> None:
        """Until every reader finished the chunk slot `seq` held (`seq - slots`)."""
        needed = seq - self.layout.slots
        if needed <= 0 or not self._lagging(needed):
            return
        deadline = time.perf_counter() + self.spin_s
        while time.perf_counter() < deadline:
            if not self._lagging(needed):
                return
            os.sched_yield()
        while lagging := self._lagging(needed):
            _U64.pack_into(self.buf, WAITING_AT, 1)
            fence()  # `waiting` before reading `done` (the reader's half is in `_release`)
            if self._lagging(needed):
                ready, _, _ = select.select([self.bells[i] for i in lagging], [], [])
                for bell in ready:
                    self._drain(bell)
            _U64.pack_into(self.buf, WAITING_AT, 0)

    def _lagging(self, needed: int) -> list[int]:
        done = self.layout.done_at
        return [i for i in range(self.layout.readers) if _U64.unpack_from(self.buf, done(i))[0] < needed]

    def _check_readers(self) -> None:
        """A reader that died closed its doorbell: say so now rather than wait on it later."""
        for fd, _ in self._poll.poll(0):
            self._drain(self.bells[self._reader_of[fd]])

    def _drain(self, bell: socket.socket) -> None:
        """Read the stale rings a reader sent (it frees slots); end of file: the reader is gone."""
        try:
            if bell.recv(_DRAIN, socket.MSG_DONTWAIT):
                return
        except BlockingIOError:
            return
        except OSError:
            pass
        reader = self.bells.index(bell)
        raise ChannelClosed(f"reader {reader} of the command ring is gone (its process ended)")

    def close(self) -> None:
        for bell in self.bells:
            bell.close()


class RingReader:
    def __init__(
        self, buf: memoryview, layout: RingLayout, reader: int, bell: socket.socket, spin_s: float
    ) -> None:
        self.buf, self.layout, self.reader, self.bell, self.spin_s = buf, layout, reader, bell, spin_s
        self.seq = 0

    def read(self) -> bytes:
        """The next message, whole (copied out of the ring)."""
        chunks = []
        while True:
            at = self._await(self.seq + 1)
            length, last = _SLOT_HEAD.unpack_from(self.buf, at)[1:]
            data = at + _SLOT_HEAD.size
            chunks.append(bytes(self.buf[data : data + length]))
            self._release(self.seq + 1)
            if last:
                return chunks[0] if len(chunks) == 1 else b"".join(chunks)

    def _await(self, seq: int) -> int:
        """The offset of slot `seq` once published: spinning for `spin_s`, then asleep."""
        at = self.layout.slot_at(seq)
        deadline = time.perf_counter() + self.spin_s
        while _U64.unpack_from(self.buf, at)[0] != seq:
            if time.perf_counter() >= deadline:
                self._sleep(at, seq)
                break
            os.sched_yield()
        fence()  # seq before the data it guards
        return at

    def _sleep(self, at: int, seq: int) -> None:
        sleeping = self.layout.sleeping_at(self.reader)
        while True:
            _U64.pack_into(self.buf, sleeping, 1)
            fence()  # `sleeping` before reading seq (the writer's half is in `RingWriter._put`)
            if _U64.unpack_from(self.buf, at)[0] == seq:
                break
            try:
                rung = self.bell.recv(_DRAIN)
            except OSError:
                rung = b""
            if not rung:
                raise ChannelClosed("the writer of the command ring is gone (rank 0 ended)")
        _U64.pack_into(self.buf, sleeping, 0)

    def _release(self, seq: int) -> None:
        fence()  # done copying before saying so
        _U64.pack_into(self.buf, self.layout.done_at(self.reader), seq)
        self.seq = seq
        fence()  # `done` before reading `waiting` (the writer's half is in `_wait_for_slot`)
        if _U64.unpack_from(self.buf, WAITING_AT)[0]:
            _ring(self.bell)

    def close(self) -> None:
        self.bell.close()


def _ring(bell: socket.socket) -> None:
    """Wake the other end. A full socket buffer holds wake-ups enough; a closed peer is found by
    the next wait on this doorbell (end of file), so neither raises here."""
    try:
        bell.send(_RING, socket.MSG_DONTWAIT)
    except (BlockingIOError, OSError):
        pass
