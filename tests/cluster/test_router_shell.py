"""The router shell: the core behind a control plane, in memory and over real ZMQ sockets (no processes)."""

from __future__ import annotations

import threading

import zmq
from router_harness import FakeLayout, prompt, update

from epd.clock import VirtualClock
from epd.cluster.messages import (
    AbortRequest,
    InstanceStats,
    PrefillTask,
    Shutdown,
    decode_for_instance,
    encode,
)
from epd.cluster.router import InMemoryControlPlane, Router, Stage, ZmqControlPlane
from epd.sampling_params import SamplingParams


def test_the_shell_sends_what_the_core_returns_and_feeds_it_what_arrives():
    fake, control = FakeLayout("1E+1P+1D"), InMemoryControlPlane()
    router = Router(fake.handles, control, VirtualClock())
    router.add_request("r", prompt(4), SamplingParams(max_tokens=2))
    [task] = control.take_sent("P0")
    assert isinstance(task, PrefillTask) and router.requests["r"].stage is Stage.PLACED
    control.post(update("D0", "r", [2], first_index=1, finish="length"))  # overtakes P's token
    control.post(InstanceStats("D0", {"running": 1.0}))
    assert router.poll(timeout_ms=0) == [] and router.instance_stats == {"D0": {"running": 1.0}}
    control.post(update("P0", "r", [1], first_index=0))
    [out] = router.poll(timeout_ms=0)
    assert out.finished and out.outputs[0].token_ids == [1, 2]
    assert not router.has_unfinished() and router.ledger.is_empty()
    assert router.max_model_len == 4096 and router.stats["encode_items"] == 0


def test_a_dead_instance_is_noticed_on_poll_and_skipped_by_broadcast():
    fake, control = FakeLayout("1E+1P+1D"), InMemoryControlPlane()
    router = Router(fake.handles, control, VirtualClock())
    router.add_request("r", prompt(4), SamplingParams(max_tokens=2))
    control.take_sent("P0")
    fake.kill("D0")
    [out] = router.poll(timeout_ms=0)
    assert out.error == (
        "instance D0 failed (its process died); no instance left to retry on "
        "(no live instance can take role D)"
    )
    assert control.take_sent("P0") == [AbortRequest("r")] and control.take_sent("D0") == []
    router.broadcast(Shutdown())
    assert {name: control.take_sent(name) for name in ("E0", "P0", "D0")} == {
        "E0": [Shutdown()],
        "P0": [Shutdown()],
        "D0": [],
    }
    assert {name: h.alive for name, h in router.instances.items()} == {"E0": True, "P0": True, "D0": False}


def test_the_zmq_plane_carries_messages_both_ways():
    ctx = zmq.Context()
    try:
        inbox = ctx.socket(zmq.PULL)
        inbox.bind("inproc://router")
        instance_inbox = ctx.socket(zmq.PULL)
        instance_inbox.bind("inproc://P0")
        plane = ZmqControlPlane(ctx, inbox, {"P0": "inproc://P0"})
        plane.send("P0", AbortRequest("r"))
        assert instance_inbox.poll(1000) and decode_for_instance(instance_inbox.recv()) == AbortRequest("r")
        assert plane.receive(0) == []
        to_router = ctx.socket(zmq.PUSH)
        to_router.connect("inproc://router")
        sent = [InstanceStats("P0", {"n": float(i)}) for i in range(3)]
        for message in sent:
            to_router.send(encode(message))
        assert plane.receive(1.0) == sent, "waits for the first, then takes all, in order"
    finally:
        ctx.destroy(linger=0)


def test_a_wake_from_another_thread_ends_a_waiting_receive():
    """A submission must not wait out the engine thread's poll of the instances' messages."""
    ctx = zmq.Context()
    try:
        inbox = ctx.socket(zmq.PULL)
        inbox.bind("inproc://router-wake")
        plane = ZmqControlPlane(ctx, inbox, {})
        received: list[list] = []
        waiting = threading.Thread(target=lambda: received.append(plane.receive(600.0)))
        waiting.start()
        plane.wake()  # before or during the wait: either way the receive returns
        waiting.join(timeout=120)
        assert not waiting.is_alive(), "receive kept waiting after wake()"
        assert received == [[]]
        plane.wake()  # a wake with nobody waiting: the next receive returns at once, then waits again
        assert plane.receive(600.0) == []
        plane.close()
        plane.wake()  # after close: nothing, no error
    finally:
        ctx.destroy(linger=0)
