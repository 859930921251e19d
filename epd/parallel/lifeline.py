"""A worker ends when its rank 0 ends, however rank 0 ended (returned, raised, killed).

Rank 0 holds the sending end of a pipe and never writes to it; the worker holds the receiving end
and a thread waiting on it. When the rank 0 process ends, the operating system closes its end and
the worker's wait returns (end of file): no polling, no timeout. The worker then exits at once
(`os._exit`): its main thread may be blocked in a collective that rank 0 will never join, which no
exception would interrupt.

Whoever creates the pipe (the launcher) must close its own copies of both ends once the two
processes started, or the end of file never comes.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import threading
from multiprocessing.connection import Connection

# What a worker waits, at most, for the end of file after a collective failed: rank 0's process
# closes its sockets and its pipe as it exits, not quite at the same instant.
CUT_GRACE_S = 10.0


def lifeline() -> tuple[Connection, Connection]:
    """(held by rank 0, watched by a worker)."""
    watched, held = mp.get_context("spawn").Pipe(duplex=False)
    return held, watched


def exit_when_cut(watched: Connection) -> threading.Thread:
    """In the worker: end this process as soon as rank 0's end of `watched` is closed."""

    def wait() -> None:
        try:
            watched.recv()  # rank 0 never sends: this returns only by raising at end of file
        except (EOFError, OSError):
            pass
        os._exit(0)

    thread = threading.Thread(target=wait, name="epd-tp-lifeline", daemon=True)
    thread.start()
    return thread


def is_cut(watched: Connection, wait_s: float = CUT_GRACE_S) -> bool:
    """Whether rank 0's end is closed (waiting up to `wait_s` for it): a failed collective then
    only means that rank 0 is gone."""
    try:
        return watched.poll(wait_s)
    except (EOFError, OSError):
        return True
