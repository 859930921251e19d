"""The cuda_ipc connector on real GPUs: in one process, across processes, across devices.

Payloads are the transfer suite's (assorted dtypes, 0-d, empty, non-contiguous, several per key),
some on the GPU and some on the CPU; what arrives must be byte-identical (sha256 digests), in send
order, on the consumer's device, and every staging region must come back once the consumer acked.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device"),
]

sys.path.insert(0, str(Path(__file__).parents[1] / "transfer"))
from helpers import MB, collect_received, collect_sent, digest, payload, spawned_consumer  # noqa: E402

from epd.transfer import ConnectorClosedError, create_connector  # noqa: E402

NUM_KEYS = 24


def _on_gpu(tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Every other key's tensors on cuda:0 (the producer's device), the rest left on the CPU."""
    # Explicitly cuda:0: a cuda_ipc connector makes its device the thread's current one.
    return {k: t.to("cuda:0") for k, t in tensors.items()} if i % 2 == 0 else tensors


def _second_device() -> str:
    return "cuda:1" if torch.cuda.device_count() > 1 else "cuda:0"


def _wait_idle(producer, timeout: float = 10.0) -> None:
    """Poll the producer (acks arrive on its socket) until its staging buffer is empty again."""
    deadline = time.monotonic() + timeout
    while producer._regions.bytes_in_use:
        assert time.monotonic() < deadline, f"{producer._regions.bytes_in_use} staging bytes never acked"
        producer.poll_received()
        time.sleep(0.005)


def test_same_process_roundtrip_in_order_and_byte_exact() -> None:
    with create_connector("cuda_ipc", device="cuda:0") as producer:
        with create_connector("cuda_ipc", device=_second_device()) as consumer:
            sent = [_on_gpu(payload(i), i) for i in range(NUM_KEYS)]
            for i, tensors in enumerate(sent):
                producer.send(consumer.address, f"mm:{i}", tensors, {"i": i})
            results = collect_sent(producer, NUM_KEYS)
            received = collect_received(consumer, NUM_KEYS)
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
            assert [r.key for r in received] == [f"mm:{i}" for i in range(NUM_KEYS)]
            assert [r.meta for r in received] == [{"i": i} for i in range(NUM_KEYS)]
            for item, tensors in zip(received, sent):
                assert digest(item.tensors) == digest(tensors)
                assert {t.device for t in item.tensors.values()} == {torch.device(_second_device())}
            _wait_idle(producer)


def test_across_processes_and_devices() -> None:
    device = _second_device()
    with spawned_consumer("cuda_ipc", NUM_KEYS, device=device) as (_, address, out_q):
        with create_connector("cuda_ipc", device="cuda:0") as producer:
            expected = []
            for i in range(NUM_KEYS):
                tensors = _on_gpu(payload(i, nbytes=64 * MB if i == 5 else None), i)
                expected.append((f"kv:{i}", digest(tensors), {"i": i}, [device]))
                producer.send(address, f"kv:{i}", tensors, {"i": i})
            results = collect_sent(producer, NUM_KEYS, timeout=60)
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
            assert out_q.get(timeout=60) == expected
            _wait_idle(producer)


def test_a_full_staging_buffer_waits_for_acks_instead_of_failing() -> None:
    # 8 keys of 3 MB through 4 MB of staging: each send waits until the previous one is acked.
    with create_connector("cuda_ipc", device="cuda:0", staging_bytes=4 * MB) as producer:
        with create_connector("cuda_ipc", device=_second_device()) as consumer:
            sent = [{"x": torch.randn(3 * MB // 4, device="cuda:0")} for _ in range(8)]
            for i, tensors in enumerate(sent):
                producer.send(consumer.address, f"k{i}", tensors)
            received, deadline = [], time.monotonic() + 30
            while len(received) < len(sent):
                assert time.monotonic() < deadline, f"{len(received)} of {len(sent)} arrived"
                received += consumer.poll_received()
                producer.poll_received()  # reads the acks that free staging regions
                time.sleep(0.002)
            assert [digest(r.tensors) for r in received] == [digest(t) for t in sent]
            assert all(r.ok for r in collect_sent(producer, len(sent)))


def test_a_payload_larger_than_the_staging_buffer_fails_clearly() -> None:
    with create_connector("cuda_ipc", device="cuda:0", staging_bytes=1 * MB) as producer:
        with create_connector("cuda_ipc", device="cuda:0") as consumer:
            big = torch.zeros(2 * MB, dtype=torch.uint8, device="cuda")
            producer.send(consumer.address, "big", {"x": big})
            producer.send(consumer.address, "small", {"x": torch.ones(16, device="cuda")})
            big, small = collect_sent(producer, 2)
            assert not big.ok and "do not fit" in big.error
            assert small.ok  # the failure harmed nothing after it
            [item] = collect_received(consumer, 1)
            assert item.key == "small" and torch.equal(item.tensors["x"].cpu(), torch.ones(16))


def test_bad_arguments_raise_and_closed_connectors_refuse() -> None:
    with pytest.raises(ValueError, match="CUDA devices"):
        create_connector("cuda_ipc", device="cpu")
    producer = create_connector("cuda_ipc", device="cuda:0")
    if torch.cuda.device_count() > 1:
        with pytest.raises(TypeError, match="cuda:1"):
            producer.send(producer.address, "k", {"x": torch.ones(1, device="cuda:1")})
    producer.close()
    producer.close()  # idempotent
    assert producer.poll_received() == [] and producer.poll_sent() == []
    with pytest.raises(ConnectorClosedError):
        producer.send(producer.address, "k", {"x": torch.ones(1, device="cuda:0")})


def test_sends_inside_then_outside_inference_mode() -> None:
    """Layer-wise KV is sent from inside the forward (inference_mode), a seeded request's hand-off
    from outside it: the staging buffer made by the first must take the second's copy."""
    with create_connector("cuda_ipc", device="cuda:0") as producer:
        with create_connector("cuda_ipc", device=_second_device()) as consumer:
            sent = [_on_gpu(payload(i), 0) for i in range(2)]
            with torch.inference_mode():
                producer.send(consumer.address, "kv:layer", sent[0], {"i": 0})
            producer.send(consumer.address, "kv:final", sent[1], {"i": 1})
            results = collect_sent(producer, 2)
            received = collect_received(consumer, 2)
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
            for item, tensors in zip(received, sent):
                assert digest(item.tensors) == digest(tensors)
            _wait_idle(producer)
