"""Timing connectors (epd.transfer) between two devices: seconds per payload, by size.

One payload at a time, as a hand-off happens: the clock runs from `send()` to the consumer holding
the tensor (on a GPU: its bytes landed, the consumer's stream synchronised); sizes are timed in
rounds (epd.plan.profile.timing). Producer and consumer live in this process (two connectors, each
with its own threads and sockets), so no process start is paid per shape; a payload crosses the
same sockets, files or device copies as between two instances. Fitted as latency + bytes /
bandwidth (epd.plan.profile.features.transfer_terms).

Payloads are bf16 vectors: the dtype of the KV and embeddings the cluster sends.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from functools import partial

import torch
import zmq

from epd.plan.profile.store import Measurement
from epd.plan.profile.timing import medians_in_rounds
from epd.transfer import Connector, create_connector

Log = Callable[[str], None]
MB = 1 << 20
WAIT_S = 60.0  # a transfer slower than this is a broken connector, not a measurement


def default_connectors(devices: tuple[str, str]) -> tuple[str, ...]:
    """What the cluster uses between these devices: cuda_ipc GPU to GPU, shm and tcp otherwise."""
    if all(torch.device(d).type == "cuda" for d in devices):
        return ("cuda_ipc",)
    return ("shm", "tcp")


def time_transfers(
    name: str, devices: tuple[str, str], sizes_mb: Sequence[float], warmup: int, repeats: int, log: Log
) -> list[Measurement]:
    """Median seconds per payload of each size through connector `name`, producer on devices[0]."""
    sizes = [max(2, int(mb * MB) // 2 * 2) for mb in sizes_mb]
    options = {"staging_bytes": max(1 << 30, 2 * max(sizes))} if name == "cuda_ipc" else {}
    with create_connector(name, device=devices[0], **options) as producer:
        with create_connector(name, device=devices[1]) as consumer:
            payloads = [torch.randn(n // 2, device=devices[0]).to(torch.bfloat16) for n in sizes]
            timings = [partial(_one, producer, consumer, payload, devices[1]) for payload in payloads]
            seconds = medians_in_rounds(timings, warmup, repeats)
    for nbytes, sec in zip(sizes, seconds):
        log(f"[transfer {name}] {nbytes / MB:.3g} MB: {sec * 1e3:.3f} ms")
    return [Measurement(nbytes, sec) for nbytes, sec in zip(sizes, seconds)]


def _one(producer: Connector, consumer: Connector, tensor: torch.Tensor, consumer_device: str) -> float:
    """Seconds from send() to the tensor usable on the consumer."""
    if tensor.is_cuda:
        torch.cuda.synchronize(tensor.device)  # the payload exists before the clock starts
    poller = zmq.Poller()
    for pollable in consumer.pollables():
        poller.register(pollable, zmq.POLLIN)
    started = time.perf_counter()
    producer.send(consumer.address, "profile", {"x": tensor})
    sent = _Completion(producer, started + WAIT_S)
    while not consumer.poll_received():
        if sent.check() and time.perf_counter() > sent.deadline:
            raise TimeoutError(f"{type(consumer).__name__}: sent, never received within {WAIT_S:.0f} s")
        poller.poll(1)
    if torch.device(consumer_device).type == "cuda":
        torch.cuda.current_stream(consumer_device).synchronize()  # landed, not just started
    seconds = time.perf_counter() - started
    while not sent.check():  # completed too, so that the next payload does not queue behind it
        time.sleep(1e-4)
    return seconds


class _Completion:
    """The producer side of one send: its result (reported once), failures raised, a deadline."""

    def __init__(self, producer: Connector, deadline: float) -> None:
        self.producer, self.deadline, self.done = producer, deadline, False

    def check(self) -> bool:
        """Whether the send has completed; raises if it failed or the deadline passed."""
        self.producer.poll_received()  # cuda_ipc: acks free the producer's staging regions
        for result in self.producer.poll_sent():
            if not result.ok:
                raise RuntimeError(f"transfer {result.key} failed: {result.error}")
            self.done = True
        if not self.done and time.perf_counter() > self.deadline:
            raise TimeoutError(f"{type(self.producer).__name__}: no transfer within {WAIT_S:.0f} s")
        return self.done
