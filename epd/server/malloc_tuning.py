"""Large blocks of the API process reused from its heap instead of mapped afresh each time.

Every request with images allocates blocks of megabytes: its body (15 MB for three 1280x960
PNGs), the decoded files, the message to the encoder. glibc maps each block past its mmap
threshold anew (128 KiB, raised as such blocks are freed up to 32 MiB) and gives heap memory
past its trim threshold back to the system, so the same megabytes were faulted in again, page
by page, for every request: ~3,600 page faults per 15 MB body, ~10 ms of CPU in a VM, a third of
what the API process spent on such a request (BENCHMARKS.md, "Pixels off the front end").

So the API process raises both thresholds once, at start: blocks up to the largest body come
from the heap, and up to the body budget (--max-buffered-request-bytes, what the server may hold
of bodies anyway) stays mapped once freed. Only glibc has `mallopt`; elsewhere nothing changes.
Instance processes are spawned, not forked: they keep glibc's defaults.

It also keeps every thread on the main heap (one arena). glibc gives threads that allocate at
once arenas of their own, which grow in extra heaps of at most 64 MiB each and unmap such a heap
as soon as it empties, whatever the trim threshold. The input threads that decode each
request's base64 still faulted their megabytes in afresh: 80-380 page faults per request,
1-175 with one arena, 1 on a GPU host (BENCHMARKS.md, "The front end's
heap, garbage collector and uvloop reads"). One arena costs little here: most of this process's
allocating holds the GIL, and the threads that allocate without it (image decoding, in an engine
that runs in this process) take its lock for a few large blocks an image. Call this before the
threads it is for first allocate: a thread keeps its arena.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import logging
from collections.abc import Callable

logger = logging.getLogger("epd.server")
M_TRIM_THRESHOLD = -1  # glibc's malloc.h
M_MMAP_THRESHOLD = -3
M_ARENA_MAX = -8
HEADROOM_BYTES = 1 << 20  # past the largest body: its request line and headers, a message's framing
INT_MAX = (1 << 31) - 1


def reuse_large_blocks(largest_block: int, retained_bytes: int) -> bool:
    """Serve blocks up to `largest_block` bytes from the main heap, for every thread, and keep up
    to `retained_bytes` of freed heap mapped. False where this is not glibc (or it refused a
    value)."""
    mallopt = _glibc_mallopt()
    largest_block, retained_bytes = largest_block + HEADROOM_BYTES, max(retained_bytes, largest_block)
    if mallopt is None or retained_bytes > INT_MAX:  # mallopt takes an int
        return False
    # The mmap threshold first: a refused one leaves glibc's own (dynamic) thresholds alone,
    # which setting the trim threshold alone would freeze at their start values.
    if not mallopt(M_MMAP_THRESHOLD, largest_block):
        logger.debug("glibc refused an mmap threshold of %d bytes: its defaults stay", largest_block)
        return False
    return bool(mallopt(M_TRIM_THRESHOLD, retained_bytes)) and bool(mallopt(M_ARENA_MAX, 1))


def _glibc_mallopt() -> Callable[[int, int], int] | None:
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None
    if not hasattr(libc, "gnu_get_libc_version"):  # only glibc has it (not musl, not macOS)
        return None
    mallopt = libc.mallopt
    mallopt.argtypes, mallopt.restype = [ctypes.c_int, ctypes.c_int], ctypes.c_int
    return mallopt
