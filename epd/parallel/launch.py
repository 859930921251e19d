"""Run a function on every rank of a tensor-parallel group, one spawned process each, and collect
what each returns: for tests and measurements (instances start their ranks through their
launcher: epd.cluster.launcher).

Waits on events, not time: each rank's result pipe and its process sentinel. A rank that raises
sends its traceback; a rank that dies without a word is reported by its exit code; either way
the other ranks (which may be blocked in a collective the dead one will never join) are
terminated and the caller gets the error.

A result travels as the bytes of a plain pickle, tensors by value. Sent as an object, torch
would share each tensor's memory through a file descriptor that this process fetches from the
rank's own process, which may have exited by then (seen under load: FileNotFoundError).
"""

from __future__ import annotations

import multiprocessing as mp
import pickle
import tempfile
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

import torch

from epd.parallel.group import TensorParallelGroup

RankFunction = Callable[..., Any]  # fn(group, *args) -> a picklable result


def run_on_ranks(fn: RankFunction, world_size: int, *args: object, backend: str | None = None) -> list[Any]:
    """`fn(group, *args)` on ranks 0..world_size-1 (spawned; `fn` importable by name); the results
    in rank order. backend None: nccl with one GPU per rank where CUDA is available, else gloo."""
    spawn = mp.get_context("spawn")
    with tempfile.TemporaryDirectory(prefix="epd-tp-") as tmp:
        init_method = (Path(tmp) / "store").as_uri()  # a file store: no port to pick
        procs, conns = [], []
        for rank in range(world_size):
            receive, send = spawn.Pipe(duplex=False)
            proc = spawn.Process(
                target=_rank_main,
                args=(send, fn, rank, world_size, init_method, backend, args),
                name=f"epd-tp{rank}",
                daemon=True,
            )
            proc.start()
            send.close()  # the child holds its end; ours would hide its death from `recv`
            procs.append(proc)
            conns.append(receive)
        try:
            return _collect(procs, conns)
        finally:
            for proc in procs:
                if proc.is_alive():
                    proc.terminate()
                proc.join()


def _collect(procs: list[mp.process.BaseProcess], conns: list[Connection]) -> list[Any]:
    outcomes: dict[int, tuple[bool, Any]] = {}
    while len(outcomes) < len(procs):
        pending = [r for r in range(len(procs)) if r not in outcomes]
        ready = wait([conns[r] for r in pending] + [procs[r].sentinel for r in pending])
        for rank in pending:
            if conns[rank] in ready or procs[rank].sentinel in ready:
                outcomes[rank] = _outcome(rank, procs[rank], conns[rank])
        if any(not ok for ok, _ in outcomes.values()):
            # A rank that failed first has sent its error before the others could notice (a
            # peer gone from a collective): report every error already sent, the cause among them.
            for rank in pending:
                if rank not in outcomes and conns[rank].poll():
                    outcomes[rank] = _outcome(rank, procs[rank], conns[rank])
            raise RuntimeError("\n".join(value for ok, value in outcomes.values() if not ok))
    return [outcomes[r][1] for r in range(len(procs))]


def _outcome(rank: int, proc: mp.process.BaseProcess, conn: Connection) -> tuple[bool, Any]:
    """(True, what the rank returned) or (False, why it has nothing)."""
    try:
        ok, value = pickle.loads(conn.recv_bytes())
    except EOFError:  # exited without sending
        proc.join()
        return False, f"tensor-parallel rank {rank} exited with code {proc.exitcode}"
    return ok, value if ok else f"tensor-parallel rank {rank} failed:\n{value}"


def _rank_main(
    conn: Connection,
    fn: RankFunction,
    rank: int,
    world_size: int,
    init_method: str,
    backend: str | None,
    args: tuple,
) -> None:
    if backend == "nccl" or (backend is None and torch.cuda.is_available()):
        torch.cuda.set_device(rank)
    group = TensorParallelGroup.join(init_method, rank, world_size, backend)
    try:
        outcome = (True, fn(group, *args))
    except BaseException:
        outcome = (False, traceback.format_exc())
    try:
        conn.send_bytes(pickle.dumps(outcome))
    except Exception:  # noqa: BLE001 - a result that does not pickle: say so, as a failure
        conn.send_bytes(pickle.dumps((False, traceback.format_exc())))
    finally:
        group.leave()
        conn.close()
