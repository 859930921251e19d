"""Unblocking readers stuck on a FIFO: how a test that names a FIFO as an image cleans up after
the code under test (which, when broken, waits in open() for a writer that never comes)."""

from __future__ import annotations

import os
from pathlib import Path


def release_fifo(fifo: Path) -> None:
    """Wake every reader blocked opening `fifo`, and remove it so that no new one can block on it.

    Linux opens a FIFO read-write without waiting, and that descriptor is a writer: readers
    blocked in open() return. The path is gone before the descriptor closes, so no new reader
    can wait on it; the woken ones then read end-of-file.
    """
    fd = os.open(fifo, os.O_RDWR | os.O_NONBLOCK)
    try:
        fifo.unlink()
    finally:
        os.close(fd)
