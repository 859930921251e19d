"""The nccl connector on real GPUs (two at least: NCCL refuses two ranks of a pair on one device).

Payloads are the transfer suite's (assorted dtypes, 0-d, empty, non-contiguous, several per key),
some on the producer's GPU and some on the CPU: what arrives must be byte-identical, in send order,
on the consumer's device. Then a cluster: 1E+1P+1D over nccl gives the tokens it gives over
cuda_ipc (fp32, small model), and the transfer benchmark's figures: the connector streams KV and
embeddings at >= 70% of NCCL's own send/recv rate between the same GPUs from 16 MB on.

    .venv/bin/pytest -q tests/gpu/test_nccl.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices"),
]

sys.path.insert(0, str(Path(__file__).parents[1] / "transfer"))
from helpers import MB, collect_received, collect_sent, digest, payload, spawned_consumer  # noqa: E402

from epd import LLM, SamplingParams  # noqa: E402
from epd.transfer import ConnectorClosedError, create_connector  # noqa: E402
from epd.transfer.bench import measure, nccl_baseline  # noqa: E402

NUM_KEYS = 24
DEVICES = ("cuda:0", "cuda:1")


def _on_gpu(tensors: dict[str, torch.Tensor], i: int) -> dict[str, torch.Tensor]:
    """Every other key's tensors on cuda:0 (the producer's device), the rest left on the CPU."""
    return {k: t.to("cuda:0") for k, t in tensors.items()} if i % 2 == 0 else tensors


def test_same_process_roundtrip_in_order_and_byte_exact() -> None:
    with (
        create_connector("nccl", device="cuda:0") as producer,
        create_connector("nccl", device="cuda:1") as consumer,
    ):
        sent = [_on_gpu(payload(i), i) for i in range(NUM_KEYS)]
        for i, tensors in enumerate(sent):
            producer.send(consumer.address, f"mm:{i}", tensors, {"i": i})
        producer.send(consumer.address, "kv:discard", {}, {"discard": True})
        results = collect_sent(producer, NUM_KEYS + 1, timeout=60)
        received = collect_received(consumer, NUM_KEYS + 1, timeout=60)
        assert all(r.ok for r in results), [r.error for r in results if not r.ok]
        assert [r.key for r in received] == [f"mm:{i}" for i in range(NUM_KEYS)] + ["kv:discard"]
        assert [r.meta for r in received[:-1]] == [{"i": i} for i in range(NUM_KEYS)]
        for item, tensors in zip(received, sent):
            assert digest(item.tensors) == digest(tensors)
            assert {t.device for t in item.tensors.values()} <= {torch.device("cuda:1")}


def test_a_burst_goes_in_coalesced_batches_in_order_and_byte_exact() -> None:
    """Keys queued faster than the send thread posts them go several to a notice, each batch one
    coalesced NCCL group on both sides: the same bytes and order as one at a time."""
    count = 100  # more than one batch holds (nccl_send._BATCH_MAX_JOBS)
    with (
        create_connector("nccl", device="cuda:0") as producer,
        create_connector("nccl", device="cuda:1") as consumer,
    ):
        sent = [_on_gpu(payload(i, nbytes=(i % 5) * MB // 4), i) for i in range(count)]
        for i, tensors in enumerate(sent):
            producer.send(consumer.address, f"kv:{i}", tensors, {"i": i})
        results = collect_sent(producer, count, timeout=60)
        received = collect_received(consumer, count, timeout=60)
        [pair] = producer._sender._pairs.values()
        coalesces = pair.channel.coalesces
    assert all(r.ok for r in results), [r.error for r in results if not r.ok]
    assert [r.key for r in results] == [item.key for item in received] == [f"kv:{i}" for i in range(count)]
    assert [digest(item.tensors) for item in received] == [digest(tensors) for tensors in sent]
    # Without coalescing (an older torch) the bytes still arrive, one op per tensor: slower.
    assert coalesces, "this torch's ProcessGroupNCCL did not coalesce the batches"


def test_across_processes_and_devices() -> None:
    with spawned_consumer("nccl", NUM_KEYS, device="cuda:1") as (_, address, out_q):
        with create_connector("nccl", device="cuda:0") as producer:
            expected = []
            for i in range(NUM_KEYS):
                tensors = _on_gpu(payload(i, nbytes=64 * MB if i == 5 else None), i)
                expected.append((f"kv:{i}", digest(tensors), {"i": i}, ["cuda:1"]))
                producer.send(address, f"kv:{i}", tensors, {"i": i})
            results = collect_sent(producer, NUM_KEYS, timeout=60)
            assert all(r.ok for r in results), [r.error for r in results if not r.ok]
            got = out_q.get(timeout=60)
            # An empty key's tensors are on no device at all; the rest are on the consumer's.
            assert [(k, d, m) for k, d, m, _ in got] == [(k, d, m) for k, d, m, _ in expected]
            assert all(devices in ([], ["cuda:1"]) for *_, devices in got)


def test_a_killed_consumer_fails_only_its_own_keys() -> None:
    with spawned_consumer("nccl", 0, device="cuda:1") as (proc, address, _):
        with (
            create_connector("nccl", device="cuda:0", send_timeout_s=5.0, retries=0) as producer,
            create_connector("nccl", device="cuda:1") as alive,
        ):
            producer.send(address, "before", {"x": torch.ones(4, device="cuda:0")})
            assert [r.ok for r in collect_sent(producer, 1, timeout=30)] == [True]  # the pair is up
            proc.kill()
            proc.join(10)
            for i in range(3):
                # 32 MB: more than NCCL buffers, so a send to the dead peer cannot complete by itself.
                producer.send(address, f"lost:{i}", {"x": torch.randn(8 * MB, device="cuda:0")})
                producer.send(alive.address, f"kept:{i}", {"x": torch.full((MB,), float(i), device="cuda:0")})
            results = {r.key: r for r in collect_sent(producer, 6, timeout=60)}
            received = collect_received(alive, 3, timeout=30)
    assert [item.key for item in received] == [f"kept:{i}" for i in range(3)]
    assert all(results[f"kept:{i}"].ok for i in range(3))
    assert not any(results[f"lost:{i}"].ok for i in range(3))


def test_bad_arguments_and_close() -> None:
    with pytest.raises(ValueError, match="CUDA devices"):
        create_connector("nccl", device="cpu")
    producer = create_connector("nccl", device="cuda:0")
    with pytest.raises(TypeError, match="cuda:1"):
        producer.send(producer.address, "k", {"x": torch.ones(1, device="cuda:1")})
    producer.close()
    producer.close()
    assert producer.poll_received() == [] and producer.poll_sent() == []
    with pytest.raises(ConnectorClosedError):
        producer.send(producer.address, "k", {"x": torch.ones(1, device="cuda:0")})


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


def test_1e1p1d_over_nccl_gives_the_cuda_ipc_tokens(model) -> None:
    sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
    from test_disaggregation import mixed_requests

    requests = mixed_requests(12, seed=11)
    params = SamplingParams(temperature=0, max_tokens=12)
    # E and D share cuda:0; every pair (E -> P, P -> D) joins two different GPUs, as NCCL needs.
    devices = "cuda:0,cuda:1,cuda:0"
    tokens = {}
    for transfer in ("cuda_ipc", "nccl"):
        with LLM(model, layout="1E+1P+1D", devices=devices, transfer=transfer, kv_streaming="request") as llm:
            outputs = llm.generate(requests, params, use_tqdm=False)
        assert [o.error for o in outputs] == [None] * len(outputs)
        tokens[transfer] = [o.outputs[0].token_ids for o in outputs]
    assert tokens["nccl"] == tokens["cuda_ipc"]


@pytest.mark.parametrize("mb", [16, 64])
@pytest.mark.parametrize("kind", ["kv", "embeddings"])
def test_streams_at_70_percent_of_nccl_send_recv(kind: str, mb: int) -> None:
    iters = 40
    baseline = nccl_baseline(mb, DEVICES, iters=iters)
    figures = measure("nccl", kind, mb, iters, DEVICES)
    ratio = figures["streamed_gbps"] / baseline
    assert ratio >= 0.7, f"{kind} {mb} MB: {figures} against NCCL send/recv {baseline:.1f} GB/s ({ratio:.0%})"
