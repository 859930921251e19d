"""Throughput of a connector between two processes on this host, next to the raw copy it stands on.

    python -m epd.transfer.bench --backend shm --mb 64 --iters 10
    python -m epd.transfer.bench --backend cuda_ipc --producer-device cuda:0 --consumer-device cuda:1 \\
        --mb 4,16,64,256 --json OUT/transfer.json
    python -m epd.transfer.bench --backend nccl --producer-device cuda:0 --consumer-device cuda:1 \\
        --mb 16,64,256 --iters 40

One-at-a-time: the producer sends one payload, the consumer (a spawned process, blocking on pollables())
takes it (on a GPU: and waits for its bytes to land), acknowledges, repeat: GB/s from send() to the
tensor being usable on the consumer (sent_at vs the consumer's clock: same host). Streamed: all
iterations back to back, first send() to last receipt (the receipts go back in one message at the
end, so that acknowledging is not part of the pipeline measured), after one such round untimed
(the consumer's allocator grows to the payloads in flight once, as in a serving instance).
cuda_ipc also reports the bandwidth its consumer-side pull copies reached on the device (CUDA
events around them): the data path alone, without the notice's trip through ZMQ and the
producer's local staging copy.

Two payload shapes per size, as the cluster sends them: KV of one request ([layers, 2, tokens,
kv_heads, head_dim], bf16, Qwen2.5-VL-7B's 28 x 4 x 128) and image embeddings ([tokens, 3584], bf16).

Baseline for GPU backends, measured in the same run: the device-to-device copy between the same two
GPUs in one process (`dst.copy_(src)`, CUDA events), whose rate the connector can at best approach;
for nccl, NCCL's own send/recv between the same two GPUs in two processes (`nccl_baseline`: the
same payloads back to back, timed from the first send to the last one done), which the connector
must reach 70% of from 16 MB on. nccl also reports `sent_gbps`: streamed, until the producer saw
its last send done on the device (the consumer's side of the pipe, without its receipt's trip back).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import queue
import statistics
import time
from typing import Any

import torch
import zmq

from epd.transfer import create_connector
from epd.transfer.nccl_channel import CONSUMER_RANK, PRODUCER_RANK, Channel, open_store, serve_store
from epd.transfer.serialization import Header, TensorSpec

MB = 1 << 20
_KV_TOKEN_BYTES = 28 * 2 * 4 * 128 * 2  # Qwen2.5-VL-7B: layers x (K, V) x kv_heads x head_dim x bf16
_EMBED_TOKEN_BYTES = 3584 * 2


def payload(kind: str, mb: float, device: str) -> torch.Tensor:
    """A bf16 tensor of about `mb` MB shaped like what the cluster sends."""
    if kind == "kv":
        tokens = max(1, int(mb * MB) // _KV_TOKEN_BYTES)
        return torch.randn(28, 2, tokens, 4, 128, device=device).to(torch.bfloat16)
    tokens = max(1, int(mb * MB) // _EMBED_TOKEN_BYTES)
    return torch.randn(tokens, 3584, device=device).to(torch.bfloat16)


def _consumer(backend: str, device: str, address_q: Any, ack_q: Any, iters: int) -> None:
    """Takes `iters` payloads one at a time, acknowledging each, then two streamed rounds
    ("warm:", "stream:") whose receipts go back per round (see below)."""
    conn = create_connector(backend, device=device)
    address_q.put(conn.address)
    poller = zmq.Poller()
    for pollable in conn.pollables():
        poller.register(pollable, zmq.POLLIN)
    got, rounds = 0, {"warm:": [], "stream:": []}
    while got < 3 * iters:
        poller.poll(60_000)
        for item in conn.poll_received():
            if torch.device(device).type == "cuda":
                torch.cuda.current_stream(device).synchronize()  # landed, not just started
            receipt = (item.key, item.sent_at, time.time())
            got += 1
            streamed = rounds.get(item.key.split(":")[0] + ":")
            if streamed is None:
                ack_q.put(receipt)
                continue
            # Streamed receipts go back together once all came: a put per key (pickling, the
            # queue's feeder thread) would compete with the connector's receive thread for the
            # GIL and measure this harness instead of the connector.
            streamed.append(receipt)
            if len(streamed) == iters:
                ack_q.put(streamed)
    time.sleep(0.2)  # the last acks (and their copy timings) are taken on the connector's ack thread
    ack_q.put(conn.copy_stats() if hasattr(conn, "copy_stats") else (0, 0.0))
    conn.close()


def measure(backend: str, kind: str, mb: float, iters: int, devices: tuple[str, str]) -> dict[str, float]:
    """GB/s one at a time (median) and streamed, for `iters` payloads of `kind` and size `mb` each way."""
    producer_device, consumer_device = devices
    ctx = mp.get_context("spawn")
    address_q, ack_q = ctx.Queue(), ctx.Queue()
    args = (backend, consumer_device, address_q, ack_q, iters)
    proc = ctx.Process(target=_consumer, args=args, daemon=True)
    proc.start()
    tensor = payload(kind, mb, producer_device)
    nbytes = tensor.numel() * tensor.element_size()
    try:
        options = {"staging_bytes": max(1 << 30, 2 * iters * nbytes)} if backend == "cuda_ipc" else {}
        with create_connector(backend, device=producer_device, **options) as producer:
            address = address_q.get(timeout=120)
            single = []
            for i in range(iters):
                producer.send(address, f"one:{i}", {"x": tensor})
                _, sent_at, received_at = _take_ack(ack_q, producer)
                single.append(nbytes / (received_at - sent_at) / 1e9)
            # A first round untimed: the consumer's allocator grows to the payloads in flight
            # (cudaMalloc each, once), as a serving instance's has long before its steady state.
            for i in range(iters):
                producer.send(address, f"warm:{i}", {"x": tensor})
            _all_sent(producer, iters)
            _take_ack(ack_q, producer)
            started = time.perf_counter()
            for i in range(iters):
                producer.send(address, f"stream:{i}", {"x": tensor})
            sent_s = _all_sent(producer, iters) - started
            acks = _take_ack(ack_q, producer)  # all of them at once (_consumer)
            streamed = nbytes * iters / (acks[-1][2] - acks[0][1]) / 1e9
            copied_bytes, copy_seconds = ack_q.get(timeout=60)
    finally:
        proc.join(30)
        if proc.is_alive():
            proc.kill()
    return {
        "mb": nbytes / MB,
        "one_at_a_time_gbps": statistics.median(single),
        "streamed_gbps": streamed,
        "sent_gbps": nbytes * iters / sent_s / 1e9,
        "device_copy_gbps": copied_bytes / copy_seconds / 1e9 if copy_seconds else None,
    }


def _take_ack(ack_q: Any, producer: Any) -> Any:
    """The consumer's next receipt (or list of them); meanwhile the producer reads its own socket
    (cuda_ipc acks)."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        producer.poll_received()
        try:
            return ack_q.get(timeout=0.001)
        except queue.Empty:
            continue
    raise TimeoutError("the consumer did not report a receipt within 120 s")


def _all_sent(producer: Any, count: int) -> float:
    """perf_counter() once `count` more sends were reported done (all ok, or RuntimeError)."""
    done, deadline = 0, time.monotonic() + 120
    while done < count:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{done} of {count} sends done within 120 s")
        results = producer.poll_sent()
        for result in results:
            if not result.ok:
                raise RuntimeError(f"send {result.key} failed: {result.error}")
            done += 1
        if not results:
            # Not a busy loop: one that never lets go of the GIL starves the connector's own
            # send thread (each of its GIL hand-overs then waits out the 5 ms switch interval).
            time.sleep(50e-6)
    return time.perf_counter()


def _baseline_consumer(port: int, device: str, nbytes: int, count: int) -> None:
    store = open_store("127.0.0.1", port, 120)
    channel = Channel.connect("nccl", store, "baseline", CONSUMER_RANK, torch.device(device), 120)
    header = Header("x", 0.0, {}, (TensorSpec("x", "uint8", (nbytes,), nbytes),))
    last = None
    for _ in range(count):
        last = channel.post_recv(header)[1]  # fresh tensors, as the connector's consumer does
    channel.wait(last, 120)
    channel.abort()


def nccl_baseline(mb: float, devices: tuple[str, str], iters: int = 20, warmup: int = 3) -> float:
    """GB/s of NCCL send/recv between the two devices, in two processes, payloads back to back."""
    nbytes = int(mb * MB)
    store = serve_store("127.0.0.1", 120)
    ctx = mp.get_context("spawn")
    args = (store.port, devices[1], nbytes, warmup + iters)
    proc = ctx.Process(target=_baseline_consumer, args=args, daemon=True)
    proc.start()
    try:
        channel = Channel.connect("nccl", store, "baseline", PRODUCER_RANK, torch.device(devices[0]), 120)
        src = torch.empty(nbytes, dtype=torch.uint8, device=devices[0])
        for _ in range(warmup):
            channel.wait(channel.post_send([src]), 120)
        started = time.perf_counter()
        for _ in range(iters):
            last = channel.post_send([src])
        channel.wait(last, 120)
        seconds = time.perf_counter() - started
        channel.abort()
    finally:
        proc.join(60)
        if proc.is_alive():
            proc.kill()
    return nbytes * iters / seconds / 1e9


def copy_baseline(mb: float, devices: tuple[str, str], iters: int = 20) -> float:
    """GB/s of one device-to-device copy between the two devices, in one process (CUDA events)."""
    src = torch.empty(int(mb * MB), dtype=torch.uint8, device=devices[0])
    dst = torch.empty_like(src, device=devices[1])
    for _ in range(3):
        dst.copy_(src)
    torch.cuda.synchronize(devices[0])
    torch.cuda.synchronize(devices[1])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    with torch.cuda.device(devices[1]):
        start.record()
        for _ in range(iters):
            dst.copy_(src)
        end.record()
        end.synchronize()
    return src.numel() * iters / (start.elapsed_time(end) / 1e3) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--backend", default="shm", choices=["shm", "tcp", "cuda_ipc", "nccl"])
    parser.add_argument("--mb", default="64", help="payload sizes in MB, comma-separated")
    parser.add_argument("--iters", type=int, default=10)
    parser.add_argument("--producer-device", default="cpu")
    parser.add_argument("--consumer-device", default="cpu")
    parser.add_argument("--json", default=None, help="also write the figures to this file")
    args = parser.parse_args()
    devices = (args.producer_device, args.consumer_device)
    on_gpu = torch.device(devices[0]).type == "cuda" and torch.device(devices[1]).type == "cuda"
    rows = []
    for mb in [float(x) for x in args.mb.split(",")]:
        baseline = None
        if on_gpu:
            baseline = nccl_baseline(mb, devices) if args.backend == "nccl" else copy_baseline(mb, devices)
        for kind in ("kv", "embeddings"):
            figures = measure(args.backend, kind, mb, args.iters, devices)
            row = {"backend": args.backend, "kind": kind, **figures, "copy_gbps": baseline}
            rows.append(row)
            print(_line(row), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"devices": devices, "rows": rows}, f, indent=2)


def _line(row: dict[str, Any]) -> str:
    text = (
        f"{row['backend']} {row['kind']:>10} {row['mb']:8.1f} MB: one at a time "
        f"{row['one_at_a_time_gbps']:7.1f} GB/s (median), streamed {row['streamed_gbps']:7.1f} GB/s"
        f" (sends done {row['sent_gbps']:7.1f} GB/s)"
    )
    if row["device_copy_gbps"]:
        text += f", consumer's pull copies {row['device_copy_gbps']:7.1f} GB/s on the device"
    if row["copy_gbps"]:
        keys = ("one_at_a_time_gbps", "streamed_gbps", "sent_gbps", "device_copy_gbps")
        ratios = [row[k] / row["copy_gbps"] for k in keys if row[k]]
        raw = "NCCL send/recv" if row["backend"] == "nccl" else "raw copy"
        text += f"; {raw} {row['copy_gbps']:7.1f} GB/s -> " + " / ".join(f"{r:.0%}" for r in ratios)
    return text


if __name__ == "__main__":
    main()
