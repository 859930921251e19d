"""Regions of one preallocated byte buffer, handed out and returned from different threads.

The cuda_ipc producer copies each payload into a region of its staging buffer (the buffer whose IPC
handle consumers open once); the region is returned when the consumer acknowledges its copy. A send
thread allocates and the caller's thread frees (it reads the acknowledgements), so a Condition joins
them: an allocation that does not fit waits for frees, up to a deadline, instead of failing at once.

First fit over a sorted free list, merged on free: payloads are few and large (one per image or per
request / layer of KV), so the list stays short.
"""

from __future__ import annotations

import bisect
import threading
import time

ALIGN = 256  # region starts: as aligned as any cudaMalloc'd pointer, for every dtype and fast copies


def align_up(n: int) -> int:
    return -(-n // ALIGN) * ALIGN


class RegionTooLargeError(ValueError):
    """A payload larger than the whole buffer: waiting would never help."""


class Regions:
    """Allocator of [offset, offset + size) regions within `capacity` bytes."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._free: list[tuple[int, int]] = [(0, capacity)]  # (offset, size), sorted by offset
        self._used: dict[int, int] = {}  # offset -> size of regions handed out
        self._changed = threading.Condition()

    @property
    def bytes_in_use(self) -> int:
        with self._changed:
            return sum(self._used.values())

    def allocate(self, nbytes: int, timeout: float) -> int | None:
        """Offset of a free region of at least `nbytes`, waiting up to `timeout` s for frees; None if
        none became free in time. RegionTooLargeError if `nbytes` exceeds the capacity."""
        size = max(ALIGN, align_up(nbytes))
        if size > self.capacity:
            raise RegionTooLargeError(f"{nbytes} bytes do not fit a staging buffer of {self.capacity} bytes")
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                offset = self._take(size)
                if offset is not None:
                    return offset
                left = deadline - time.monotonic()
                if left <= 0:
                    return None
                self._changed.wait(left)

    def free(self, offset: int) -> bool:
        """Return the region at `offset`; False (and nothing changes) if no region starts there."""
        with self._changed:
            size = self._used.pop(offset, None)
            if size is None:
                return False
            self._insert(offset, size)
            self._changed.notify_all()
            return True

    def _take(self, size: int) -> int | None:
        for i, (offset, free_size) in enumerate(self._free):
            if free_size >= size:
                if free_size == size:
                    del self._free[i]
                else:
                    self._free[i] = (offset + size, free_size - size)
                self._used[offset] = size
                return offset
        return None

    def _insert(self, offset: int, size: int) -> None:
        i = bisect.bisect(self._free, (offset, size))
        if i < len(self._free) and offset + size == self._free[i][0]:  # merge with the next
            size += self._free.pop(i)[1]
        if i > 0 and self._free[i - 1][0] + self._free[i - 1][1] == offset:  # and with the previous
            prev_offset, prev_size = self._free[i - 1]
            self._free[i - 1] = (prev_offset, prev_size + size)
        else:
            self._free.insert(i, (offset, size))
