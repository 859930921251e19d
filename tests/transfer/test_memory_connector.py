"""Memory connectors (epd.transfer.memory): the Connector contract on virtual time, no threads."""

from __future__ import annotations

import pytest
import torch

from epd.clock import VirtualClock
from epd.transfer.base import ConnectorClosedError
from epd.transfer.memory import MemoryNetwork


def pair(network: MemoryNetwork, clock: VirtualClock):
    return network.connector("a", clock), network.connector("b", clock)


def test_a_send_lands_when_due_in_order_and_is_reported_once():
    clock = VirtualClock()
    network = MemoryNetwork(latency_s=0.5)
    a, b = pair(network, clock)
    first, second = torch.arange(4.0), torch.ones(2)

    a.send(b.address, "k1", {"t": first}, {"shape": (4,)})
    a.send(b.address, "k2", {"t": second})

    assert network.next_arrival() == 0.5 and b.poll_received() == [] and a.poll_sent() == []
    landed = network.deliver_until(0.5)
    assert [(d.source, d.dest, d.key, d.nbytes) for d in landed] == [
        (a.address, b.address, "k1", 16),
        (a.address, b.address, "k2", 8),
    ]
    received = b.poll_received()
    assert [r.key for r in received] == ["k1", "k2"] and received[0].tensors["t"] is first
    assert received[0].meta == {"shape": [4]}, "meta comes as msgpack would bring it"
    assert [(r.key, r.ok, r.seconds) for r in a.poll_sent()] == [("k1", True, 0.5), ("k2", True, 0.5)]
    assert a.poll_sent() == [] and b.poll_received() == [] and network.next_arrival() is None


def test_one_pair_shares_a_link_so_a_big_transfer_delays_the_next():
    clock = VirtualClock()
    network = MemoryNetwork(bandwidth_bytes_per_s=100.0)
    a, b = pair(network, clock)
    c = network.connector("c", clock)

    a.send(b.address, "big", {"t": torch.zeros(100)})  # 400 bytes: 4 s on the wire
    a.send(b.address, "small", {"t": torch.zeros(1)})  # behind it: 4.04 s
    a.send(c.address, "other", {"t": torch.zeros(1)})  # another pair, another link: 0.04 s

    arrivals = {d.key: d.time for d in network.deliver_until(10.0)}
    assert arrivals == pytest.approx({"big": 4.0, "small": 4.04, "other": 0.04})


def test_sends_take_their_time_from_the_senders_clock():
    clock = VirtualClock(3.0)
    network = MemoryNetwork(latency_s=1.0)
    a, b = pair(network, clock)
    a.send(b.address, "k", {})
    assert network.next_arrival() == 4.0
    assert network.deliver_until(3.5) == [] and len(network.deliver_until(4.0)) == 1
    assert b.poll_received()[0].sent_at == 3.0


def test_closing_abandons_what_a_sender_still_has_in_flight_and_fails_sends_to_a_closed_receiver():
    clock = VirtualClock()
    network = MemoryNetwork(latency_s=1.0)
    a, b = pair(network, clock)
    a.send(b.address, "to-closed", {})
    b.send(a.address, "from-closed", {})
    b.close()
    b.close()  # idempotent

    assert network.deliver_until(1.0) == []
    [failed] = a.poll_sent()
    assert (failed.key, failed.ok) == ("to-closed", False) and failed.error
    assert a.poll_received() == [], "what a closed connector sent is abandoned"
    with pytest.raises(ConnectorClosedError):
        b.send(a.address, "late", {})
    assert b.poll_sent() == [] and b.poll_received() == [] and b.pollables() == []


def test_bad_arguments_raise_at_once():
    network = MemoryNetwork()
    a = network.connector("a", VirtualClock())
    with pytest.raises(ValueError, match="no memory connector"):
        a.send("memory://nowhere", "k", {})
    with pytest.raises(TypeError):
        a.send(a.address, "k", {"t": [1, 2]})
    with pytest.raises(ValueError, match="exists already"):
        network.connector("a", VirtualClock())
