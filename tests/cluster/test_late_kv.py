"""An abort that reaches the decode instance before the request's KV: D must not decode for nobody;
and layers that reach it after their hand-off no longer needs them: D must not keep them.

The abort travels router -> D on the control socket and the KV P -> D through the connector, so
nothing orders them: a client that hangs up at the first token makes the abort overtake the KV.
Here the race is built, not hoped for: real P and D instances (real engines, shm connector, zmq
sockets) run in the test process, and the test turns their loops itself, so D provably handles the
abort before P has even prefilled the request.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import replace

import pytest
import torch
import zmq

from epd.cluster.instance import Instance, InstanceConfig
from epd.cluster.kv_handoff import DroppedKV
from epd.cluster.layout import Layout
from epd.cluster.messages import (
    AbortRequest,
    PrefillTask,
    RequestUpdate,
    ToRouter,
    decode_for_router,
    encode,
)
from epd.entrypoints.async_engine import EngineArgs
from epd.sampling_params import SamplingParams
from epd.transfer.base import Received, create_backend

WAIT_S = 120.0  # an overall bound on each wait for a state, never a guess at how long work takes
PROMPT = list(range(10, 60))


class Harness:
    """A P and a D instance in this process, a router inbox, and control sockets to both."""

    def __init__(self, model: str, kv_streaming: str) -> None:
        self.ctx = zmq.Context()
        self.router_inbox = self.ctx.socket(zmq.PULL)
        router_address = f"tcp://127.0.0.1:{self.router_inbox.bind_to_random_port('tcp://127.0.0.1')}"
        specs = {s.name: s for s in Layout.parse("1E+1P+1D").instances("cpu")}
        engine = EngineArgs(model=model, block_size=4, num_kv_blocks=512).engine_config()
        cfg = InstanceConfig(specs["P0"], engine, router_address, "shm", kv_streaming=kv_streaming)
        self.prefill = self._instance(cfg)
        self.decode = self._instance(replace(cfg, spec=specs["D0"]))
        self.control = {i.name: self._control_socket(i) for i in (self.prefill, self.decode)}
        self.received: list[ToRouter] = []

    def _instance(self, cfg: InstanceConfig) -> Instance:
        outbox = self.ctx.socket(zmq.PUSH)
        outbox.connect(cfg.router_address)
        return Instance(cfg, self.ctx, outbox)

    def _control_socket(self, instance: Instance) -> zmq.Socket:
        control = self.ctx.socket(zmq.PUSH)
        control.connect(instance.control_address)
        return control

    def send(self, instance: Instance, message: object) -> None:
        self.control[instance.name].send(encode(message))

    def deliver_control(self, instance: Instance) -> None:
        """Wait until a control message sits in the instance's inbox, then let it handle it."""
        assert instance.inbox.poll(int(WAIT_S * 1000)), f"{instance.name} got no control message"
        instance.run_once()

    def run_until(self, instance: Instance, done: Callable[[], bool], what: str) -> None:
        deadline = time.monotonic() + WAIT_S
        while not done():
            assert time.monotonic() < deadline, f"{instance.name}: {what} not within {WAIT_S} s"
            instance.run_once()
            self.collect(timeout_ms=10)

    def collect(self, timeout_ms: int = 0) -> None:
        """Read what the instances told the router so far."""
        while self.router_inbox.poll(timeout_ms):
            self.received.append(decode_for_router(self.router_inbox.recv()))
            timeout_ms = 0

    def updates_from(self, name: str, request_id: str) -> list[RequestUpdate]:
        return [
            m
            for m in self.received
            if isinstance(m, RequestUpdate) and m.instance == name and m.request_id == request_id
        ]

    def close(self) -> None:
        for instance in (self.prefill, self.decode):
            instance.close()
        self.router_inbox.close(linger=0)
        self.ctx.destroy(linger=0)


@contextmanager
def harness(model: str, kv_streaming: str) -> Iterator[Harness]:
    h = Harness(model, kv_streaming)
    try:
        yield h
    finally:
        h.close()


def prefill_task(request_id: str, decode_dest: str) -> PrefillTask:
    params = SamplingParams(temperature=0, max_tokens=800, ignore_eos=True)
    return PrefillTask(request_id, PROMPT, [], [], [], params, time.time(), decode_dest)


@pytest.mark.parametrize("kv_streaming", ["request", "layer"])
def test_kv_arriving_after_its_abort_is_dropped(checkpoints, kv_streaming):
    with harness(str(checkpoints["qwen2_5_vl"]), kv_streaming) as h:
        p, d, rid = h.prefill, h.decode, "hung-up"
        # 1. The abort reaches D first: D knows nothing of the request yet.
        h.send(d, AbortRequest(rid))
        h.deliver_control(d)
        # 2. Only then does P get the request: it prefills and hands the KV off to D.
        h.send(p, prefill_task(rid, d.connector.address))
        h.run_until(p, lambda: any(u.handed_off for u in h.updates_from("P0", rid)), "hand-off")
        # 3. The KV arrives at D, after its abort.
        h.run_until(d, lambda: kv_handled(d, rid), "the KV's arrival")
        for _ in range(3):  # turns in which a wrongly started request would be scheduled
            d.run_once()
        h.collect()

        stats = d.stats()
        assert rid not in d.engine.requests, "D decodes a request aborted before its KV came"
        assert stats["running_requests"] == 0 and stats["waiting_requests"] == 0
        assert stats["kv_cache_usage"] == 0, "D holds KV blocks for an aborted request"
        assert stats["kv_parts_buffered"] == 0, "D holds streamed layers of an aborted request"
        assert stats["kv_late_handoffs_dropped_total"] == 1
        assert stats["kv_late_requests_remembered"] == 0, "the abort is forgotten once its KV came"
        assert h.updates_from("D0", rid) == [], "the router finished it already: D reports nothing"

        # D still decodes a request that was not aborted.
        h.send(p, prefill_task("kept", d.connector.address))
        h.run_until(p, lambda: any(u.handed_off for u in h.updates_from("P0", "kept")), "hand-off")
        h.run_until(d, lambda: "kept" in d.engine.requests, "the second KV's arrival")
        h.run_until(d, lambda: len(h.updates_from("D0", "kept")) > 0, "decoding")


def kv_handled(d: Instance, rid: str) -> bool:
    """D has taken the request's `kv:` message: it either started the request or dropped its KV."""
    return rid in d.engine.requests or d.stats().get("kv_late_handoffs_dropped_total", 0) > 0


# ---- layers that arrive after their hand-off no longer needs them ---------------------------------
# A part whose send failed is retried and can arrive after its `kv:` message (epd.transfer.retry).
# Each case sends D its messages in a chosen order through a real connector (FIFO per pair).

LATE_PART_CASES = {
    # case: what D gets, in order ("abort" on the control socket, the rest through the connector)
    "aborted before anything": ["abort", "kvl:0", "kv:", "kvl:1"],
    "aborted while the hand-off waited": ["kvl:0", "kv:", "abort", "kvl:1"],
    "discarded by P": ["kvl:0", "discard", "kvl:1"],
}


@pytest.mark.parametrize("case", LATE_PART_CASES)
def test_layers_arriving_after_their_handoff_no_longer_needs_them_are_dropped(checkpoints, case):
    with harness(str(checkpoints["qwen2_5_vl"]), "layer") as h:
        d, rid = h.decode, "late-part"
        producer = create_backend("shm")
        try:
            for i, step in enumerate(LATE_PART_CASES[case]):
                if step == "abort":
                    h.send(d, AbortRequest(rid))
                    h.deliver_control(d)
                    continue
                producer.send(d.connector.address, *late_part_message(rid, step))
                # Each message handled before the next goes: the order is the case's, not the OS's.
                sent = i + 1 - steps_before(case, i)
                h.run_until(d, lambda n=sent: messages_handled(d) == n, step)
        finally:
            producer.close()
        stats = d.stats()
        assert stats["kv_parts_buffered"] == 0, "D holds a layer nothing will claim"
        assert stats["kv_handoffs_awaiting_layers"] == 0
        assert stats["kv_late_requests_remembered"] == 0, "everything due came: the id is forgotten"
        assert stats["kv_late_parts_dropped_total"] + stats["kv_parts_received_total"] == 2
        assert rid not in d.engine.requests
        h.collect()
        assert h.updates_from("D0", rid) == [], "the router finished it already: D reports nothing"


def late_part_message(rid: str, step: str) -> tuple[str, dict, dict]:
    """(key, tensors, meta) of one step of a case: a layer part, the hand-off of 2 streamed layers,
    or P's discard notice after 2 streamed layers."""
    if step.startswith("kvl:"):
        layer = int(step[4:])
        return f"kvl:{rid}:{layer}", {"kv": torch.zeros(2, 3, 2, 8)}, {"request_id": rid, "layer": layer}
    if step == "discard":
        return f"kv:{rid}", {}, {"request_id": rid, "discard": True, "streamed_layers": 2}
    return f"kv:{rid}", {}, {"request_id": rid, "streamed_layers": 2, "first_token": 0}


def steps_before(case: str, i: int) -> int:
    """How many of the case's first i + 1 steps are aborts (they do not go through the connector)."""
    return LATE_PART_CASES[case][: i + 1].count("abort")


def messages_handled(d: Instance) -> int:
    """Transfer messages D has taken, whatever it made of them."""
    s = d.stats()
    parts = s["kv_parts_received_total"] + s["kv_late_parts_dropped_total"]
    return int(parts + s["kv_handoffs_received_total"])


def test_dropped_kv_remembers_what_is_due_and_a_bounded_number_of_requests():
    dropped = DroppedKV(capacity=3)
    for rid in ("a", "b", "c", "d"):
        dropped.remember(rid)  # aborted before anything came
    assert "a" not in dropped and all(rid in dropped for rid in "bcd")  # the oldest went first

    # Its hand-off counts 2 streamed layers: one came before, one after; then it is forgotten.
    assert dropped.drop_part("c", 0)
    assert dropped.drop_handoff(handoff("c", streamed_layers=2)) and "c" in dropped
    assert dropped.drop_part("c", 1) and "c" not in dropped
    assert not dropped.drop_part("c", 1)  # not dropped: someone else's, if it ever came
    assert not dropped.drop_handoff(handoff("c"))  # one hand-off per request id

    dropped.remember("b", arrived={0}, handoff=handoff("b", streamed_layers=1))  # nothing due
    assert "b" not in dropped
    dropped.remember("e", arrived={1}, handoff=handoff("e", streamed_layers=3))  # layers 0 and 2 due
    assert not dropped.drop_handoff(handoff("e", streamed_layers=3)), "its hand-off came already"
    assert dropped.drop_part("e", 2) and dropped.drop_part("e", 0) and "e" not in dropped
    assert not dropped.drop_part("never-remembered", 0)
    assert dropped.stats() == {
        "kv_late_requests_remembered": 1,  # "d"
        "kv_late_handoffs_dropped_total": 1,
        "kv_late_parts_dropped_total": 4,
    }


def handoff(rid: str, **meta: object) -> Received:
    return Received(f"kv:{rid}", {}, {"request_id": rid, **meta}, 0, 0.0)
