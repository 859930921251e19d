"""Image files in memory the API process shares with the encoding instances of its host.

Why: every image file a client sends reaches the encoder that decodes it. Sent as ZMQ frames, each
3.7 MB PNG cost the API process 0.75 ms of CPU in its zmq I/O thread on the H200 host (the kernel
copying it into a Unix socket; BENCHMARKS.md), an eighth of all it spends on an image. Here the
front end decodes a data URL's base64 straight into this memory (epd.inputs.base64_into) and the
encode task names where the file lies; the encoder copies it out on its own threads.

    API process                                       E instance (same host)
    base64 text --decode--> [ SharedFiles: memfd ]  <--mmap, read-only-- SharedFileReader
                            task: file_at=(offset, length) ----------->  SharedFile.read()

| piece              | lives in      | does                                                       |
|--------------------|---------------|------------------------------------------------------------|
| `SharedFiles`      | API process   | one anonymous shared file (memfd), first-fit allocator     |
| `SharedFileReader` | each instance | maps it by `/proc/<pid>/fd/<fd>` (its first line holds a   |
|                    |               | random token it checks); None where it cannot              |
| `SharedFile`       | E's task item | a file's place; `read` copies it out and checks its key     |

Lifetime: a file's memory is freed when the last reference to its buffer goes (a finalizer on the
array behind it): the router holds its request's files until their images are encoded, for
retries elsewhere. So nothing frees a file by hand, and a leak can only fill the arena, after
which files take the heap and ZMQ frames again, as before. An encoder may still read a file after
its request ended (aborted while the task was queued, or a retry elsewhere finished first): its
memory may then hold another file. So `read` copies, then checks the BLAKE3 key of what it
copied against the image's key (the key is BLAKE3 of the file: epd.inputs.image.image_key), and a
mismatch is an error for a request nobody waits for; it costs the encoder ~0.5 ms an image.

Only images go this way (a video chunk's key is not its file's hash). An instance on another host
(a Ray worker elsewhere) cannot open the path and says so in `InstanceReady`: the router sends it
frames. The memfd dies with the API process; no name is left behind after a crash.
"""

from __future__ import annotations

import bisect
import collections
import logging
import mmap
import os
import threading
import weakref

import blake3
import numpy as np

from epd.inputs.errors import InvalidInputError

logger = logging.getLogger(__name__)

ALIGN = 64  # a file starts on a cache line
TOKEN_BYTES = 16  # the arena's first line: a random token, told to the instances with the path


class SharedFiles:
    """The API process's shared memory for image files: `take` a buffer, fill it, hand it on."""

    def __init__(self, size: int) -> None:
        self.size = _aligned(size) + ALIGN
        self._fd = os.memfd_create("epd-image-files", os.MFD_CLOEXEC)
        os.ftruncate(self._fd, self.size)
        self._map = mmap.mmap(self._fd, self.size)
        self._base = np.frombuffer(self._map, np.uint8, count=1).ctypes.data  # the mapping's address
        # A path another process opens the memfd by, and what its first line holds: on another host
        # the same path may name some other process's file, which the token tells apart.
        self.path = f"/proc/{os.getpid()}/fd/{self._fd}"
        self.token = os.urandom(TOKEN_BYTES)
        self._map[:TOKEN_BYTES] = self.token
        self._lock = threading.Lock()
        self._free_starts, self._free_sizes = [ALIGN], [self.size - ALIGN]  # sorted by start, coalesced
        # Buffers whose last reference went, given back at the next take: a finalizer may run in
        # the middle of a take (a garbage collection there), which must not wait for the lock.
        self._released: collections.deque[tuple[int, int]] = collections.deque()
        self._used = 0
        self.taken = self.refused = 0  # files placed here / that went to the heap (arena full)

    def take(self, nbytes: int) -> memoryview | None:
        """A writable buffer of `nbytes` here, freed when no reference to it (or to a slice of
        it) is left; None when the arena has no room (the caller uses the heap)."""
        size = _aligned(max(nbytes, 1))
        with self._lock:
            self._give_back_released()
            start = self._allocate(size)
            if start is None:
                self.refused += 1
                if self.refused == 1:
                    logger.warning("shared image files full (%d bytes): files go by ZMQ frames", self.size)
                return None
            self._used += size
            self.taken += 1
        # An array of its own per buffer (not slices of one array), so that its finalizer runs when it goes.
        buffer = np.frombuffer(self._map, np.uint8, count=nbytes, offset=start)
        weakref.finalize(buffer, self._released.append, (start, size))
        return memoryview(buffer)

    @property
    def used(self) -> int:
        """Bytes of buffers still referenced (alignment included)."""
        with self._lock:
            self._give_back_released()
            return self._used

    def locate(self, data: object) -> tuple[int, int] | None:
        """(offset, length) of `data` if it lies in this arena (a buffer `take` gave, or a slice of
        one), else None."""
        if not isinstance(data, memoryview) or not isinstance(data.obj, np.ndarray) or not len(data):
            return None
        offset = np.frombuffer(data, np.uint8).ctypes.data - self._base
        return (offset, len(data)) if 0 <= offset <= self.size - len(data) else None

    def close(self) -> None:
        """Give back the file descriptor; the mapping goes with the last buffer out."""
        try:
            os.close(self._fd)
        except OSError:
            pass

    def _allocate(self, size: int) -> int | None:
        for i, free in enumerate(self._free_sizes):
            if free >= size:
                start = self._free_starts[i]
                if free == size:
                    del self._free_starts[i], self._free_sizes[i]
                else:
                    self._free_starts[i] += size
                    self._free_sizes[i] -= size
                return start
        return None

    def _give_back_released(self) -> None:
        """Return released buffers to the free list, joining neighbours (under the lock)."""
        while self._released:
            start, size = self._released.popleft()
            self._used -= size
            i = bisect.bisect(self._free_starts, start)
            self._free_starts.insert(i, start)
            self._free_sizes.insert(i, size)
            if i + 1 < len(self._free_starts) and start + size == self._free_starts[i + 1]:
                self._free_sizes[i] += self._free_sizes.pop(i + 1)
                self._free_starts.pop(i + 1)
            if i > 0 and self._free_starts[i - 1] + self._free_sizes[i - 1] == start:
                self._free_sizes[i - 1] += self._free_sizes.pop(i)
                self._free_starts.pop(i)


class SharedFileReader:
    """An instance's read-only view of the API process's `SharedFiles`."""

    def __init__(self, path: str, token: bytes) -> None:
        with open(path, "rb") as f:
            self._map = mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ)
        self._view = memoryview(self._map)
        if self._view[:TOKEN_BYTES] != token:
            raise ValueError(f"{path} is not the API process's shared files (another host's process?)")

    @classmethod
    def open(cls, where: tuple[str, bytes] | None) -> SharedFileReader | None:
        """The reader of the arena at `where` (its path and token), or None where this process
        cannot map it (another host, no access)."""
        if where is None:
            return None
        try:
            return cls(*where)
        except (OSError, ValueError):
            return None

    def file(self, offset: int, length: int, key: str) -> SharedFile:
        if not 0 <= offset <= len(self._view) - length:
            raise ValueError(
                f"a shared file at {offset}+{length} lies outside the {len(self._view)} bytes mapped"
            )
        return SharedFile(self._view[offset : offset + length], key)


class SharedFile:
    """An image file in the API process's shared memory, not read yet (truthy, as bytes are)."""

    def __init__(self, view: memoryview, key: str) -> None:
        self._view, self.key = view, key

    def __len__(self) -> int:
        return len(self._view)

    def read(self) -> bytes:
        """The file's bytes, copied out; InvalidInputError if they are no longer the image's
        (its request ended and the memory holds another file: module docstring)."""
        data = bytes(self._view)
        if "b3:" + blake3.blake3(data).hexdigest() != self.key:
            raise InvalidInputError(
                "the image's file was released before this encoder read it (its request ended)"
            )
        return data


def _aligned(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN
