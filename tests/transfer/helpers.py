"""Factories and bounded waits for the transfer tests, plus the consumer that runs in a spawned process.

Every wait here has a deadline and fails with an AssertionError when it passes: a transfer bug must
fail the test, never hang it.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
import zmq

from epd.transfer import Connector, Received, SendResult, create_connector

BACKENDS = ("local", "shm", "tcp")
REMOTE_BACKENDS = ("shm", "tcp")
MB = 1 << 20


def payload(i: int, nbytes: int | None = None) -> dict[str, torch.Tensor]:
    """Deterministic tensors for key number i: assorted dtypes and sizes, sometimes several per key."""
    dtypes = (torch.float32, torch.bfloat16, torch.int64, torch.float16, torch.uint8, torch.bool)
    sizes = (0, 1, 7, 1000, 4096, 65535, 65536, 70000, MB, 3 * MB)
    dtype = dtypes[i % len(dtypes)]
    itemsize = torch.empty((), dtype=dtype).element_size()
    numel = (nbytes if nbytes is not None else sizes[i % len(sizes)]) // itemsize
    gen = torch.Generator().manual_seed(i)
    if dtype.is_floating_point:
        main = torch.randn(numel, generator=gen).to(dtype)
    else:
        main = torch.randint(0, 2 if dtype == torch.bool else 100, (numel,), generator=gen).to(dtype)
    tensors = {"main": main}
    if i % 3 == 0:  # several tensors per key, one of them 0-d and one non-contiguous
        tensors["scale"] = torch.tensor(float(i))
        tensors["grid"] = torch.arange(12, dtype=torch.int64).reshape(3, 4).t()
    return tensors


def digest(tensors: dict[str, torch.Tensor]) -> str:
    """sha256 over names, dtypes, shapes and bytes: equal digests mean equal tensors."""
    h = hashlib.sha256()
    for name, tensor in tensors.items():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def collect_received(conn: Connector, count: int, timeout: float = 20.0) -> list[Received]:
    """Exactly `count` Received, waiting on conn.pollables() (as an instance loop would)."""
    poller = zmq.Poller()
    for pollable in conn.pollables():
        poller.register(pollable, zmq.POLLIN)
    out: list[Received] = []
    deadline = time.monotonic() + timeout
    while True:
        out += conn.poll_received()
        if len(out) >= count:
            assert len(out) == count, f"expected {count} keys, got {len(out)}"
            return out
        remaining = deadline - time.monotonic()
        assert remaining > 0, f"received {len(out)}/{count} keys within {timeout}s"
        if conn.pollables():
            poller.poll(int(min(remaining, 0.1) * 1000) + 1)
        else:
            time.sleep(0.001)


def collect_sent(conn: Connector, count: int, timeout: float = 20.0) -> list[SendResult]:
    out: list[SendResult] = []
    deadline = time.monotonic() + timeout
    while len(out) < count:
        assert time.monotonic() < deadline, f"{len(out)}/{count} sends completed within {timeout}s"
        out += conn.poll_sent()
        time.sleep(0.002)
    assert len(out) == count, f"expected {count} send results, got {len(out)}"
    return out


def shm_segments(prefix: str, shm_dir: str = "/dev/shm") -> list[str]:
    return sorted(name for name in os.listdir(shm_dir) if name.startswith(prefix))


def consumer_main(
    backend: str, address_q: Any, out_q: Any, count: int, timeout: float, device: str = "cpu"
) -> None:
    """Spawned-process consumer: publish the address, then receive `count` keys and report
    (key, digest, meta, device) for each, in arrival order. count=0: stay idle (never read) until killed."""
    torch.set_num_threads(1)
    conn = create_connector(backend, device=device)
    address_q.put(conn.address)
    if count == 0:
        time.sleep(timeout)
        return
    items = collect_received(conn, count, timeout)
    out_q.put([(item.key, digest(item.tensors), item.meta, _devices(item)) for item in items])
    conn.close()


def _devices(item: Received) -> list[str]:
    return sorted({str(t.device) for t in item.tensors.values()})


@contextmanager
def spawned_consumer(
    backend: str, count: int, timeout: float = 60.0, device: str = "cpu"
) -> Iterator[tuple[Any, str, Any]]:
    """(process, its address, its result queue) for a consumer_main in a fresh spawned process."""
    ctx = mp.get_context("spawn")
    address_q, out_q = ctx.Queue(), ctx.Queue()
    args = (backend, address_q, out_q, count, timeout, device)
    proc = ctx.Process(target=consumer_main, args=args, daemon=True)
    proc.start()
    try:
        yield proc, address_q.get(timeout=60), out_q
    finally:
        if proc.is_alive():
            proc.kill()  # SIGKILL also ends a SIGSTOPped process
        proc.join(10)
