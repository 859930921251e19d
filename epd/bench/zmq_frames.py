"""CPU per image-sized frame on a zmq PUSH -> PULL pair: loopback TCP against a Unix socket (ipc),
the choice epd.cluster.local_sockets makes between the router and the instances of its host.

    python -m epd.bench.zmq_frames [--frames 200 --bytes 3700000 --repeats 3]

The receiver is another process, as an instance is. Prints, per transport and repeat, the
sender's and the receiver's CPU (process time, zmq's I/O threads included) and the wall time per
frame (the sender's loop, until the receiver has taken them all).
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import tempfile
import time

import zmq

TRANSPORTS = ("tcp", "ipc")


def _receive(address: str, frames: int, bound: mp.Event, result: mp.Queue) -> None:
    ctx = zmq.Context()
    pull = ctx.socket(zmq.PULL)
    pull.bind(address)
    bound.set()
    started = time.process_time()
    for _ in range(frames):
        pull.recv(copy=False)
    result.put(time.process_time() - started)
    ctx.destroy(linger=0)


def measure(address: str, frames: int, size: int) -> tuple[float, float, float]:
    """(sender CPU, receiver CPU, wall) in ms per frame."""
    bound, result = mp.Event(), mp.Queue()
    receiver = mp.Process(target=_receive, args=(address, frames, bound, result))
    receiver.start()
    bound.wait()
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH)
    push.connect(address)
    data = os.urandom(size)
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(frames):
        push.send(data, copy=False)
    received_cpu = result.get()  # the receiver has taken every frame
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    receiver.join()
    ctx.destroy(linger=0)
    return 1e3 * cpu / frames, 1e3 * received_cpu / frames, 1e3 * wall / frames


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--frames", type=int, default=200)
    p.add_argument("--bytes", type=int, default=3_700_000, help="a 1280x960 noise PNG's size")
    p.add_argument("--repeats", type=int, default=3)
    args = p.parse_args()
    rows: dict[str, list[tuple[float, float, float]]] = {t: [] for t in TRANSPORTS}
    with tempfile.TemporaryDirectory() as tmp:
        for repeat in range(args.repeats):
            for transport in TRANSPORTS:
                address = f"ipc://{tmp}/frames-{repeat}" if transport == "ipc" else _free_tcp_address()
                rows[transport].append(measure(address, args.frames, args.bytes))
    for transport, runs in rows.items():
        cells = [", ".join(f"{run[i]:.2f}" for run in runs) for i in range(3)]
        print(f"{transport}: sender ms/frame {cells[0]} | receiver {cells[1]} | wall {cells[2]}")


def _free_tcp_address() -> str:
    ctx = zmq.Context()
    port = ctx.socket(zmq.PULL).bind_to_random_port("tcp://127.0.0.1")
    ctx.destroy(linger=0)  # the port is free again for the receiver to bind
    return f"tcp://127.0.0.1:{port}"


if __name__ == "__main__":
    main()
