"""shm's own promise: no segment outlives its use, whoever reads it, closes, or crashes."""

from __future__ import annotations

import os
import signal
from pathlib import Path

import torch
import zmq

from epd.transfer import create_connector
from epd.transfer.serialization import Header, encode, spec_of
from epd.transfer.shm import ShmNotice

from .helpers import collect_received, collect_sent, payload, shm_segments, spawned_consumer


def test_segment_names_carry_pid_and_are_unique_per_connector() -> None:
    with create_connector("shm") as a, create_connector("shm") as b:
        assert a.segment_prefix.startswith(f"epd-shm-{os.getpid()}-")
        assert a.segment_prefix != b.segment_prefix


def test_no_segment_left_once_the_consumer_has_read() -> None:
    with create_connector("shm") as producer, create_connector("shm") as consumer:
        for i in range(5):
            producer.send(consumer.address, f"k{i}", payload(i))
        assert all(r.ok for r in collect_sent(producer, 5))
        assert len(collect_received(consumer, 5)) == 5
        assert shm_segments(producer.segment_prefix) == []  # before any close()


def test_producer_close_reclaims_what_a_crashed_consumer_never_read() -> None:
    producer = create_connector("shm")
    try:
        with spawned_consumer("shm", count=0) as (proc, address, _):  # count=0: connects, never reads
            for i in range(3):
                producer.send(address, f"k{i}", payload(i))
            assert all(r.ok for r in collect_sent(producer, 3))
            assert len(shm_segments(producer.segment_prefix)) == 3
            os.kill(proc.pid, signal.SIGKILL)
    finally:
        producer.close()
    assert shm_segments(producer.segment_prefix) == []


def test_consumer_close_unlinks_segments_it_never_polled() -> None:
    with create_connector("shm") as producer:
        consumer = create_connector("shm")
        producer.send(consumer.address, "k", {"x": torch.ones(1000)})
        assert collect_sent(producer, 1)[0].ok
        assert consumer.pollables()[0].poll(10_000, zmq.POLLIN)  # the notice has arrived, unread
        assert len(shm_segments(producer.segment_prefix)) == 1
        consumer.close()
        assert shm_segments(producer.segment_prefix) == []


def test_failed_send_leaves_no_segment() -> None:
    with create_connector("shm", send_timeout_s=0.2) as producer:
        with create_connector("shm") as consumer:
            producer.send(consumer.address, "sparse", {"x": torch.eye(2).to_sparse()})
            producer.send("tcp://127.0.0.1:1", "unreachable", {"x": torch.ones(3)})
            assert not any(r.ok for r in collect_sent(producer, 2, timeout=10))
        assert shm_segments(producer.segment_prefix) == []


def test_a_notice_naming_a_foreign_file_is_dropped_and_the_file_kept(tmp_path: Path) -> None:
    victim = tmp_path / "precious.bin"
    victim.write_bytes(b"\0" * 16)
    spec = spec_of("x", torch.zeros(4))
    notice = encode(ShmNotice(Header("evil", 0.0, {}, (spec,)), str(victim)))
    with create_connector("shm") as consumer:
        push = zmq.Context.instance().socket(zmq.PUSH)
        try:
            push.connect(consumer.address)
            push.send(notice)
            assert consumer.pollables()[0].poll(10_000, zmq.POLLIN)
            assert consumer.poll_received() == []
        finally:
            push.close(linger=0)
    assert victim.exists()
