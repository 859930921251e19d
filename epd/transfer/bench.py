"""Throughput of a connector between two processes on this host.

    python -m epd.transfer.bench --backend shm --mb 64 --iters 10

One-at-a-time: the producer sends one tensor, the consumer (a spawned process, blocking on pollables())
acknowledges it, repeat: MB/s from send() to the tensor being in the consumer's hands (sent_at vs the
consumer's clock: same host). Streamed: all iterations sent back to back, first send() to last receipt.
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import statistics
import time
from typing import Any

import torch
import zmq

from epd.transfer import create_connector


def _consumer(backend: str, address_q: Any, ack_q: Any, count: int) -> None:
    conn = create_connector(backend)
    address_q.put(conn.address)
    poller = zmq.Poller()
    for pollable in conn.pollables():
        poller.register(pollable, zmq.POLLIN)
    got = 0
    while got < count:
        poller.poll(60_000)
        for item in conn.poll_received():
            ack_q.put((item.key, item.sent_at, time.time()))
            got += 1
    conn.close()


def run(backend: str, mb: int, iters: int) -> tuple[float, float]:
    """(median one-at-a-time MB/s, streamed MB/s) for `iters` tensors of `mb` MB each way."""
    ctx = mp.get_context("spawn")
    address_q, ack_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_consumer, args=(backend, address_q, ack_q, 2 * iters), daemon=True)
    proc.start()
    tensor = torch.randn(mb * (1 << 20) // 4)
    try:
        with create_connector(backend) as producer:
            address = address_q.get(timeout=60)
            single = []
            for i in range(iters):
                producer.send(address, f"one:{i}", {"x": tensor})
                _, sent_at, received_at = ack_q.get(timeout=60)
                single.append(mb / (received_at - sent_at))
            for i in range(iters):
                producer.send(address, f"stream:{i}", {"x": tensor})
            acks = [ack_q.get(timeout=60) for _ in range(iters)]
            streamed = mb * iters / (acks[-1][2] - acks[0][1])
            assert all(r.ok for r in producer.poll_sent())
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return statistics.median(single), streamed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="shm", choices=["shm", "tcp"])
    parser.add_argument("--mb", type=int, default=64)
    parser.add_argument("--iters", type=int, default=10)
    args = parser.parse_args()
    single, streamed = run(args.backend, args.mb, args.iters)
    print(f"{args.backend}: {args.mb} MB tensor: one at a time {single:.0f} MB/s (median), ", end="")
    print(f"streamed {streamed:.0f} MB/s")


if __name__ == "__main__":
    main()
