"""`transfer="auto"` across hosts: the backend of each pair follows from its two ends
(epd.transfer.auto), and one auto connector moves payloads to peers of either kind."""

from __future__ import annotations

import pytest
import torch

from epd.cluster.cluster import resolve_transfer
from epd.transfer import create_connector
from epd.transfer.auto import End, choose, parse_address

from .helpers import collect_received, collect_sent, digest, payload


@pytest.mark.parametrize(
    ("same_host", "producer_gpu", "consumer_gpu", "backend"),
    [
        (True, True, True, "cuda_ipc"),
        (False, True, True, "nccl"),
        (True, True, False, "shm"),
        (True, False, False, "shm"),
        (False, False, True, "tcp"),
        (False, True, False, "tcp"),
    ],
)
def test_each_pair_gets_the_backend_of_its_ends(same_host, producer_gpu, consumer_gpu, backend) -> None:
    producer = End("host-a/boot", producer_gpu, {})
    consumer = End("host-a/boot" if same_host else "host-b/boot", consumer_gpu, {})
    assert choose(producer, consumer) == backend


def test_auto_stays_per_pair_only_with_a_multi_host_launcher() -> None:
    assert resolve_transfer("auto", ["cuda:0", "cuda:1"]) == "cuda_ipc"
    assert resolve_transfer("auto", ["cpu", "cpu"]) == "shm"
    assert resolve_transfer("auto", ["cpu", "cuda:0"], multi_host=True) == "auto"
    assert resolve_transfer("tcp", ["cuda:0"], multi_host=True) == "tcp"


def test_one_producer_two_kinds_of_peers() -> None:
    with (
        create_connector("auto", host_id="host-a") as producer,
        create_connector("auto", host_id="host-a") as neighbour,
        create_connector("auto", host_id="host-b") as remote,
    ):
        assert producer.backend_for(neighbour.address) == "shm"
        assert producer.backend_for(remote.address) == "tcp"
        sent = [payload(i) for i in range(6)]
        for i, tensors in enumerate(sent):
            producer.send((neighbour if i % 2 else remote).address, f"k{i}", tensors, {"i": i})
        results = collect_sent(producer, 6)
        near, far = collect_received(neighbour, 3), collect_received(remote, 3)
    assert all(r.ok for r in results)
    # Results name the address the caller sent to, so retries and the router's bookkeeping match.
    assert {r.dest for r in results} == {neighbour.address, remote.address}
    assert [item.key for item in near] == ["k1", "k3", "k5"]
    assert [item.key for item in far] == ["k0", "k2", "k4"]
    for item in near + far:
        assert digest(item.tensors) == digest(sent[item.meta["i"]])


def test_addresses_round_trip_and_bad_ones_are_refused() -> None:
    with create_connector("auto", host_id="h") as conn:
        end = parse_address(conn.address)
        assert end.host_id == "h" and not end.on_gpu and set(end.addresses) == {"shm", "tcp"}
        with pytest.raises(ValueError, match="not an auto connector address"):
            conn.send("tcp://127.0.0.1:5555", "k", {"x": torch.ones(1)})
