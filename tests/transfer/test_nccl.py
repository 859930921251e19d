"""The nccl connector's logic on CPU: the same code over torch.distributed's gloo backend.

What the GPU run adds (tests/gpu/test_nccl.py) is the NCCL transport itself; the pairs, their
rendezvous through the consumer's store, the ordering, completion, failures and close are all
exercised here, within a process and between processes.
"""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from collections import deque
from typing import Any

import pytest
import torch
import zmq

from epd.transfer import ConnectorClosedError, create_connector
from epd.transfer.nccl_channel import (
    CONSUMER_RANK,
    NOTICE_DECODER,
    PRODUCER_RANK,
    Channel,
    Hello,
    Notice,
    PeerAddress,
    open_store,
    parse_address,
    serve_store,
)
from epd.transfer.nccl_send import _BATCH_MAX_BYTES, _BATCH_MAX_JOBS, _next_batch
from epd.transfer.sender import SendJob
from epd.transfer.serialization import Header, encode, spec_of

from .helpers import MB, collect_received, collect_sent, digest, payload

NUM_KEYS = 16


def gloo(**options: Any):
    return create_connector("nccl", device="cpu", backend="gloo", **options)


def test_round_trip_in_order_byte_exact_with_meta() -> None:
    with gloo() as producer, gloo() as consumer:
        sent = [payload(i) for i in range(NUM_KEYS)]
        for i, tensors in enumerate(sent):
            producer.send(consumer.address, f"kv:{i}", tensors, {"i": i, "pos": (i, i + 1)})
        producer.send(consumer.address, "kv:discard", {}, {"discard": True})  # a key without tensors
        results = collect_sent(producer, NUM_KEYS + 1)
        received = collect_received(consumer, NUM_KEYS + 1)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert [r.key for r in results] == [f"kv:{i}" for i in range(NUM_KEYS)] + ["kv:discard"]
    assert [r.key for r in received] == [r.key for r in results]
    assert [r.meta for r in received[:-1]] == [{"i": i, "pos": [i, i + 1]} for i in range(NUM_KEYS)]
    for item, tensors in zip(received, sent):
        assert digest(item.tensors) == digest(tensors)
        assert item.nbytes == sum(t.numel() * t.element_size() for t in tensors.values())
    assert received[-1].tensors == {} and received[-1].meta == {"discard": True}


def test_two_producers_into_one_consumer_each_in_order() -> None:
    with gloo() as first, gloo() as second, gloo() as consumer:
        for i in range(NUM_KEYS):
            (first if i % 2 else second).send(consumer.address, f"{i % 2}:{i}", payload(i), {"i": i})
        assert all(r.ok for r in collect_sent(first, NUM_KEYS // 2) + collect_sent(second, NUM_KEYS // 2))
        keys = [item.key for item in collect_received(consumer, NUM_KEYS)]
    for producer in ("0", "1"):
        mine = [k for k in keys if k.startswith(producer + ":")]
        assert mine == sorted(mine, key=lambda k: int(k.split(":")[1]))


def _consume(address_q: Any, out_q: Any, count: int) -> None:
    torch.set_num_threads(1)
    with gloo() as conn:
        address_q.put(conn.address)
        items = collect_received(conn, count, timeout=60)
        out_q.put([(item.key, digest(item.tensors), item.meta) for item in items])


def test_across_processes() -> None:
    ctx = mp.get_context("spawn")
    address_q, out_q = ctx.Queue(), ctx.Queue()
    proc = ctx.Process(target=_consume, args=(address_q, out_q, NUM_KEYS), daemon=True)
    proc.start()
    try:
        address = address_q.get(timeout=60)
        with gloo() as producer:
            expected = []
            for i in range(NUM_KEYS):
                tensors = payload(i, nbytes=8 * MB if i == 3 else None)
                producer.send(address, f"mm:{i}", tensors, {"i": i})
                expected.append((f"mm:{i}", digest(tensors), {"i": i}))
            assert all(r.ok for r in collect_sent(producer, NUM_KEYS, timeout=60))
            assert out_q.get(timeout=60) == expected
    finally:
        proc.kill()
        proc.join(10)


def test_a_dead_consumer_fails_only_its_own_keys() -> None:
    with gloo(send_timeout_s=1.5) as producer, gloo() as alive:
        gone = gloo()
        gone_address = gone.address
        gone.close()  # nobody listens there any more
        for i in range(4):
            producer.send(gone_address, f"lost:{i}", payload(i))
            producer.send(alive.address, f"kept:{i}", payload(i))
        results = {r.key: r for r in collect_sent(producer, 8)}
        received = collect_received(alive, 4)
    assert [item.key for item in received] == [f"kept:{i}" for i in range(4)]
    assert all(results[f"kept:{i}"].ok for i in range(4))
    assert all(not results[f"lost:{i}"].ok and "within 1.5s" in results[f"lost:{i}"].error for i in range(4))


def _silent_producer(consumer_address: str, pair: str) -> threading.Thread:
    """A producer that says hello, joins the pair and announces a key, but never sends its bytes
    (as one that died between its notice and its send)."""
    peer = parse_address(consumer_address)
    sock = zmq.Context.instance().socket(zmq.PUSH)
    sock.connect(peer.notice_endpoint)
    sock.send(encode(Hello(pair)))
    header = Header("never", time.time(), {}, (spec_of("x", torch.ones(4)),))

    def join() -> None:
        store = open_store(peer.host, peer.store_port, 10)
        Channel.connect("gloo", store, pair, PRODUCER_RANK, torch.device("cpu"), 10)
        sock.send(encode(Notice(pair, (header,))))
        sock.close(linger=1000)

    thread = threading.Thread(target=join, daemon=True)
    thread.start()
    return thread


def test_a_producer_that_never_sends_costs_the_consumer_nothing_else() -> None:
    with gloo(send_timeout_s=1.0) as consumer, gloo() as producer:
        _silent_producer(consumer.address, "silent-pair").join(15)
        tensors = payload(7)
        producer.send(consumer.address, "after", tensors)
        [item] = collect_received(consumer, 1)
        assert item.key == "after" and digest(item.tensors) == digest(tensors)
        deadline = time.monotonic() + 10  # the silent pair is dropped once its recv is overdue
        while "silent-pair" in consumer._receiver._pairs:
            assert time.monotonic() < deadline, "the silent pair was never dropped"
            time.sleep(0.05)
        producer.send(consumer.address, "later", tensors)
        assert [i.key for i in collect_received(consumer, 1)] == ["later"]


def test_bad_arguments_and_close() -> None:
    with pytest.raises(ValueError, match="backend"):
        create_connector("nccl", device="cpu", backend="mpi")
    with pytest.raises(ValueError, match="CUDA devices"):
        create_connector("nccl", device="cpu")
    conn = gloo(retries=0)
    with pytest.raises(TypeError):
        conn.send(conn.address, "k", {"x": [1, 2]})
    conn.send("tcp://127.0.0.1:1", "k", {"x": torch.ones(2)})  # not an nccl address: reported
    [result] = collect_sent(conn, 1)
    assert not result.ok and "not an nccl connector address" in result.error
    conn.close()
    conn.close()  # idempotent
    assert conn.poll_sent() == [] and conn.poll_received() == [] and conn.pollables() == []
    with pytest.raises(ConnectorClosedError):
        conn.send(conn.address, "k", {"x": torch.ones(1)})


def test_many_queued_keys_keep_their_order_across_batches() -> None:
    count = 3 * _BATCH_MAX_JOBS + 5  # more than one batch holds, whatever the timing
    with gloo() as producer, gloo() as consumer:
        sent = [payload(i, nbytes=(i % 7) * 1000) for i in range(count)]
        for i, tensors in enumerate(sent):
            producer.send(consumer.address, f"kv:{i}", tensors, {"i": i})
        results = collect_sent(producer, count)
        received = collect_received(consumer, count)
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert [r.key for r in results] == [item.key for item in received] == [f"kv:{i}" for i in range(count)]
    assert [digest(item.tensors) for item in received] == [digest(tensors) for tensors in sent]
    assert [item.meta for item in received] == [{"i": i} for i in range(count)]


def test_a_batch_is_bounded_in_jobs_and_bytes_but_never_empty() -> None:
    def queue(*sizes: int) -> deque[SendJob]:
        return deque(SendJob("d", f"k{i}", {}, {}, n, 0.0, 0.0) for i, n in enumerate(sizes))

    assert len(_next_batch(queue(*[1] * (_BATCH_MAX_JOBS + 5)))) == _BATCH_MAX_JOBS
    assert [job.key for job in _next_batch(queue(_BATCH_MAX_BYTES + 1, 1))] == ["k0"]
    half = _BATCH_MAX_BYTES // 2
    assert [job.key for job in _next_batch(queue(half, half, 1, 1))] == ["k0", "k1"]


class _HandMadeConsumer:
    """A consumer built from the connector's own parts (notice socket, store, Channel), so that a
    test reads the notices themselves: how the producer batched its keys."""

    def __init__(self) -> None:
        self.store = serve_store("127.0.0.1", 10)
        self.pull = zmq.Context.instance().socket(zmq.PULL)
        port = self.pull.bind_to_random_port("tcp://127.0.0.1")
        self.address = str(PeerAddress("127.0.0.1", port, self.store.port))

    def next_message(self) -> Hello | Notice:
        assert self.pull.poll(10_000), "no notice within 10s"
        return NOTICE_DECODER.decode(self.pull.recv())

    def join(self) -> Channel:
        """Take the producer's Hello and join its pair (the warm-up included)."""
        hello = self.next_message()
        assert isinstance(hello, Hello)
        return Channel.connect("gloo", self.store, hello.pair, CONSUMER_RANK, torch.device("cpu"), 10)

    def batches(self, keys: int) -> list[tuple[Header, ...]]:
        """The notices that announce the next `keys` keys, one tuple of headers per notice."""
        out: list[tuple[Header, ...]] = []
        while sum(len(headers) for headers in out) < keys:
            notice = self.next_message()
            assert isinstance(notice, Notice)
            out.append(notice.headers)
        return out

    def close(self) -> None:
        self.pull.close(linger=0)


def test_keys_queued_while_the_pair_connects_go_as_batches_in_order() -> None:
    consumer = _HandMadeConsumer()
    try:
        with gloo() as producer:
            sent = [payload(i) for i in range(8)]
            for i, tensors in enumerate(sent):  # all queued before the pair exists
                producer.send(consumer.address, f"kv:{i}", tensors, {"i": i})
            channel = consumer.join()
            batches = consumer.batches(len(sent))
            assert [h.key for headers in batches for h in headers] == [f"kv:{i}" for i in range(8)]
            assert max(len(headers) for headers in batches) > 1  # one notice, several keys
            received = []
            for headers in batches:  # one batch of recvs per notice, as the connector's consumer
                tensors, done = channel.post_recvs(list(headers))
                assert channel.wait(done, 10)
                received += tensors
            results = collect_sent(producer, len(sent))
            channel.abort()
    finally:
        consumer.close()
    assert [(r.key, r.ok) for r in results] == [(f"kv:{i}", True) for i in range(8)]
    assert [digest(tensors) for tensors in received] == [digest(tensors) for tensors in sent]


def test_a_batch_its_consumer_never_takes_fails_whole_and_only_its_pair() -> None:
    consumer = _HandMadeConsumer()
    try:
        # No retries: what is reported is the batch's own failure, not a later attempt's.
        with gloo(send_timeout_s=1.5, retries=0) as producer, gloo() as alive:
            for i in range(4):
                producer.send(consumer.address, f"lost:{i}", payload(i))
            channel = consumer.join()
            consumer.batches(4)  # announced, and their recvs never posted (a consumer that hung)
            for i in range(4):
                producer.send(alive.address, f"kept:{i}", payload(i))
            results = {r.key: r for r in collect_sent(producer, 8)}
            received = collect_received(alive, 4)
            channel.abort()
    finally:
        consumer.close()
    assert [item.key for item in received] == [f"kept:{i}" for i in range(4)]
    assert all(results[f"kept:{i}"].ok for i in range(4))
    lost = [results[f"lost:{i}"] for i in range(4)]
    assert all(not r.ok and "did not take the payload within 1.5s" in r.error for r in lost)
