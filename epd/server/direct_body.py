"""A large request body read from the socket straight into one buffer of its size.

epd.server.connections reads a Content-Length body past h11 (module docstring there). The socket
reads land in this buffer (`recv_into`: asyncio's BufferedProtocol), and the app is handed
`memoryview` slices of it as they fill, so each byte of the body is written once in the API
process, by the kernel:

    buffer: [ taken by the app | filled, not taken yet | free: the next read lands here ]
            0                taken                  filled                          size

The app gets the slices as its ASGI body chunks; once it has them all, `whole_body` gives back
the buffer itself (epd.server.body), with no join. Reading a 15 MB body (three 1280x960 PNGs)
into fresh `bytes` per read and joining them at the end took 5.7 ms of CPU, against 3.2 ms
read into one buffer (loopback TCP, measured alone; BENCHMARKS.md, "Pixels off the front end").

The buffer is not zeroed first (`unzeroed_bytearray`): nothing outside the
filled region is ever handed out, and the whole buffer only once every byte of it came from the
socket.
"""

from __future__ import annotations

import ctypes
from collections.abc import Callable, Sequence


class DirectBody:
    """One body's buffer: the bytes already received (`head`, copied in) then `left` more."""

    def __init__(self, head: bytes | bytearray, left: int) -> None:
        self.size = len(head) + left
        self._view: memoryview | None = memoryview(unzeroed_bytearray(self.size))
        self._view[: len(head)] = head
        self.filled = len(head)
        self.taken = 0

    @property
    def complete(self) -> bool:
        return self.filled == self.size

    @property
    def unread(self) -> int:
        """Bytes filled that the app has not taken yet."""
        return self.filled - self.taken

    def free_space(self) -> memoryview:
        """Where the next socket read goes: the rest of the body, never past its end (a pipelined
        request after it stays on the socket, for h11)."""
        assert self._view is not None and not self.complete
        return self._view[self.filled :]

    def filled_by(self, nbytes: int) -> None:
        self.filled += nbytes

    def take(self) -> memoryview | bytes:
        """The bytes filled since the last call. Once all are taken the buffer is no longer
        referenced from here: the app's slices alone keep it."""
        if self._view is None:
            return b""
        chunk = self._view[self.taken : self.filled]
        self.taken = self.filled
        if self.taken == self.size:
            self._view = None
        return chunk


class BufferBudget:
    """Bytes of body buffers made for bodies still arriving, all connections together. A buffer is
    made at its body's declared length, before the bytes come: unbounded, a thousand clients each
    declaring 32 MiB and sending a byte would have 32 GB reserved. Past the bound a body takes
    h11's path, held as its bytes come, as any other (its bytes are counted by the app's body
    budget either way: epd.server.body)."""

    def __init__(self, limit: int) -> None:
        self.limit, self.used = limit, 0

    def take(self, n: int) -> bool:
        if self.used + n > self.limit:
            return False
        self.used += n
        return True

    def give_back(self, n: int) -> None:
        self.used -= n


def whole_body(chunks: Sequence[bytes | bytearray | memoryview], size: int) -> bytearray | None:
    """The buffer behind `chunks` when they are, together, all of one DirectBody (as the app got
    them: slices of one buffer, each byte once, in order); else None."""
    if not chunks or not all(isinstance(c, memoryview) for c in chunks):
        return None
    buffer = chunks[0].obj
    if not isinstance(buffer, bytearray) or len(buffer) != size:
        return None
    return buffer if all(c.obj is buffer for c in chunks) else None


def unzeroed_bytearray(size: int) -> bytearray:
    """A bytearray of `size` bytes holding whatever its memory held, for a caller that writes every
    byte before any is read (a body's buffer).
    `bytearray(size)` writes zeros first, 0.3 ms per 11 MB; CPython's constructor given no
    source copies nothing. Elsewhere than CPython, it is `bytearray(size)`."""
    if _from_string_and_size is None or size <= 0:
        return bytearray(size)
    return _from_string_and_size(None, size)


def _c_bytearray_constructor() -> Callable[[None, int], bytearray] | None:
    try:
        function = ctypes.pythonapi.PyByteArray_FromStringAndSize
    except (AttributeError, ValueError):  # not CPython
        return None
    function.restype, function.argtypes = ctypes.py_object, [ctypes.c_char_p, ctypes.c_ssize_t]
    return function


_from_string_and_size = _c_bytearray_constructor()
