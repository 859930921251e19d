"""shm and tcp between real processes (multiprocessing spawn): the way E, P and D instances use them."""

from __future__ import annotations

import os
import signal
import threading

import pytest
import torch

from epd.transfer import create_connector

from .helpers import MB, REMOTE_BACKENDS, collect_sent, digest, payload, spawned_consumer

NUM_KEYS = 50
BIG_KEY = 25  # this one carries 64 MB


@pytest.mark.parametrize("backend", REMOTE_BACKENDS)
def test_fifo_and_content_across_processes(backend: str) -> None:
    with spawned_consumer(backend, NUM_KEYS) as (_, address, out_q), create_connector(backend) as producer:
        expected = []
        for i in range(NUM_KEYS):
            tensors = payload(i, nbytes=64 * MB if i == BIG_KEY else None)
            expected.append((f"mm:{i}", digest(tensors), {"i": i}, ["cpu"]))
            producer.send(address, f"mm:{i}", tensors, {"i": i})
        results = collect_sent(producer, NUM_KEYS, timeout=60)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert [r.key for r in results] == [key for key, *_ in expected]
        # The producer stays open until the consumer has read everything (shm: close reclaims segments).
        assert out_q.get(timeout=60) == expected


def test_tcp_send_returns_while_the_consumer_is_stopped() -> None:
    # The consumer process is SIGSTOPped: it cannot take a single byte, so 100 MB cannot complete. A send()
    # that waited for it would only return once the watchdog resumes the consumer; one that returns
    # while the watchdog has not fired did not wait, however slow this machine is.
    with spawned_consumer("tcp", 1) as (proc, address, out_q), create_connector("tcp") as producer:
        os.kill(proc.pid, signal.SIGSTOP)
        resumed = threading.Event()
        watchdog = threading.Timer(120.0, _resume, (proc.pid, resumed))
        watchdog.start()
        try:
            big = {"x": torch.randn(25 * MB)}
            producer.send(address, "big", big)
            assert not resumed.is_set(), "send() returned only once the consumer could read"
            assert producer.poll_sent() == []  # not done: the consumer has not read
        finally:
            watchdog.cancel()
            os.kill(proc.pid, signal.SIGCONT)
        [result] = collect_sent(producer, 1, timeout=30)
        assert result.ok
        assert out_q.get(timeout=30) == [("big", digest(big), {}, ["cpu"])]


def _resume(pid: int, resumed: threading.Event) -> None:
    resumed.set()
    os.kill(pid, signal.SIGCONT)
