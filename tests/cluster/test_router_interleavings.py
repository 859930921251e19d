"""Many requests' messages in random orders: none is lost, each ends exactly once, nothing stays held.

Fake instances answer what the router sends them at once, as a real one would in the end: an encoder
ships images to P and reports EncodeDone; P counts the images on their way as the real prefill stage
does (epd.cluster.instance.prefill_stage), asks for what it lacks and nobody sends, prefills once it
has all of them, and its first token lets D produce the rest. Each instance's messages reach the
router in the order it sent them (one PUSH socket each); which instance's message comes next, when an
encoder works through its next task, when a request is added or aborted and when an instance dies is
what hypothesis chooses.
"""

from __future__ import annotations

from collections import Counter, deque
from dataclasses import dataclass, field

from hypothesis import given, settings
from hypothesis import strategies as st
from router_harness import arrived, encode_done, image, make_core, need, prompt, update

from epd.cluster.messages import (
    AbortRequest,
    EmbeddingsLost,
    EncodeTask,
    PrefillTask,
    ToInstance,
    ToRouter,
)
from epd.cluster.router import RouterCore
from epd.sampling_params import SamplingParams

LAYOUT = "2E+2P+2D"
MORTAL = ("E0", "E1", "P0", "P1", "D1")  # at most one of them dies: D0 and one of each other role live


@dataclass
class FakePrefill:
    """What one prefill instance knows: its tasks, images, and the transfers it counts on (as the
    real prefill stage counts them)."""

    tasks: dict[str, PrefillTask] = field(default_factory=dict)
    waiting: dict[str, set[str]] = field(default_factory=dict)  # request -> image hashes it lacks
    has: set[str] = field(default_factory=set)  # images it holds (it never evicts here)
    announced: Counter[str] = field(default_factory=Counter)  # images on their way here
    unannounced: Counter[str] = field(default_factory=Counter)  # arrived before their task


@dataclass
class FakeInstances:
    """Every instance of LAYOUT: what each has sent the router (a FIFO each), what each P waits for."""

    core: RouterCore
    outbox: dict[str, deque[ToRouter]] = field(default_factory=dict)
    prefills: dict[str, FakePrefill] = field(default_factory=dict)
    encode_queue: dict[str, deque[EncodeTask]] = field(default_factory=dict)
    aborted: set[tuple[str, str]] = field(default_factory=set)  # (instance, request)
    dead: set[str] = field(default_factory=set)

    def receive(self, instance: str, message: ToInstance) -> None:
        if instance in self.dead:
            return
        if isinstance(message, PrefillTask):
            self._prefill_task(instance, message)
        elif isinstance(message, EncodeTask):
            self.encode_queue.setdefault(instance, deque()).append(message)
        elif isinstance(message, AbortRequest):
            self.aborted.add((instance, message.request_id))
            self.p(instance).waiting.pop(message.request_id, None)
        elif isinstance(message, EmbeddingsLost):
            for content_hash in message.content_hashes:
                self._lost(instance, content_hash)

    def p(self, instance: str) -> FakePrefill:
        return self.prefills.setdefault(instance, FakePrefill())

    def _send(self, instance: str, message: ToRouter) -> None:
        self.outbox.setdefault(instance, deque()).append(message)

    def _prefill_task(self, instance: str, task: PrefillTask) -> None:
        p = self.p(instance)
        p.tasks[task.request_id] = task
        for index in task.encoding:
            self._count(p.unannounced, p.announced, task.image_hashes[index])
        missing = set() if task.pixels is not None else set(task.image_hashes) - p.has
        p.waiting[task.request_id] = missing
        ask = []
        for index, content_hash in enumerate(task.image_hashes):
            if content_hash in missing and p.announced[content_hash] == 0:
                p.announced[content_hash] += 1
                ask.append(index)
        if ask:
            self._send(instance, need(instance, task.request_id, ask))
        if not missing:
            self._prefill(instance, task.request_id)

    @staticmethod
    def _count(use_first: Counter[str], otherwise: Counter[str], content_hash: str) -> None:
        """One transfer of `content_hash` matched (`use_first` had one) or counted (`otherwise`)."""
        if use_first[content_hash] > 0:
            use_first[content_hash] -= 1
        else:
            otherwise[content_hash] += 1

    def encode_next(self, encoder: str) -> None:
        self._encode(encoder, self.encode_queue[encoder].popleft())

    def _encode(self, encoder: str, task: EncodeTask) -> None:
        self._send(encoder, encode_done(encoder, task.request_id, [item.index for item in task.items]))
        prefill = task.dest.removeprefix("data://")
        if prefill in self.dead:
            return  # the transfer fails; nothing arrives
        p = self.p(prefill)
        for item in task.items:  # the embeddings reach P through the connector, not the router
            self._count(p.announced, p.unannounced, item.content_hash)
            p.has.add(item.content_hash)
            waiters = [rid for rid, hashes in p.waiting.items() if item.content_hash in hashes]
            self._send(prefill, arrived(prefill, item.content_hash, encoder, waiters))
            for rid in waiters:
                p.waiting[rid].discard(item.content_hash)
                if not p.waiting[rid]:
                    self._prefill(prefill, rid)

    def _lost(self, instance: str, content_hash: str) -> None:
        p = self.p(instance)
        if p.announced[content_hash] > 0:
            p.announced[content_hash] -= 1
        waiters = [rid for rid, hashes in p.waiting.items() if content_hash in hashes]
        if waiters and p.announced[content_hash] == 0:
            p.announced[content_hash] += 1
            index = p.tasks[waiters[0]].image_hashes.index(content_hash)
            self._send(instance, need(instance, waiters[0], [index]))

    def _prefill(self, instance: str, rid: str) -> None:
        p = self.p(instance)
        del p.waiting[rid]
        if (instance, rid) in self.aborted or instance in self.dead:
            return
        task = p.tasks[rid]
        n, start = task.params.max_tokens, len(task.output_token_ids)  # a continuation goes on
        self._send(instance, update(instance, rid, [start], start, "length" if n == start + 1 else None))
        decoder = instance if task.decode_dest is None else task.decode_dest.removeprefix("data://")
        if n > start + 1 and (decoder, rid) not in self.aborted and decoder not in self.dead:
            for i in range(start + 1, n):
                self._send(decoder, update(decoder, rid, [i], i, "length" if i == n - 1 else None))

    def kill(self, instance: str) -> None:
        self.dead.add(instance)
        self.outbox.pop(instance, None)  # what it had not delivered yet is lost with it
        self.encode_queue.pop(instance, None)


def request_prompt(index: int, num_images: int):
    # Shared hashes across requests exercise cache affinity and images that arrive for others.
    images = [image(f"img{(index + k) % 3}", side=2 + k) for k in range(num_images)]
    return prompt(6, images)


# (images, tokens to generate) per request
requests_strategy = st.lists(st.tuples(st.integers(0, 2), st.integers(1, 4)), min_size=1, max_size=8)


@settings(max_examples=150, deadline=None)
@given(requests=requests_strategy, data=st.data())
def test_random_interleavings_lose_no_request(requests, data):
    core, fake_layout, clock = make_core(LAYOUT)
    fakes = FakeInstances(core)
    to_add = deque(enumerate(requests))
    ended: dict[str, list] = {}
    aborted = set()

    def deliver(outgoing) -> None:
        for instance, message in outgoing:
            fakes.receive(instance, message)

    def collect() -> None:
        for out in core.take_outputs():
            if out.finished:
                ended.setdefault(out.request_id, []).append(out)

    while to_add or any(fakes.outbox.values()) or any(fakes.encode_queue.values()):
        actions = ["add"] if to_add else []
        actions += [f"from {name}" for name, queue in sorted(fakes.outbox.items()) if queue]
        actions += [f"encode on {name}" for name, queue in sorted(fakes.encode_queue.items()) if queue]
        actions += ["abort"] if core.requests else []
        actions += ["kill"] if not fakes.dead else []
        action = data.draw(st.sampled_from(actions))
        clock.advance(0.01)
        if action == "add":
            index, (num_images, tokens) = to_add.popleft()
            params = SamplingParams(max_tokens=tokens)
            deliver(core.add_request(str(index), request_prompt(index, num_images), params))
        elif action == "abort":
            rid = data.draw(st.sampled_from(sorted(core.requests)))
            aborted.add(rid)
            deliver(core.abort(rid))
        elif action == "kill":
            victim = data.draw(st.sampled_from(MORTAL))
            # At most one instance dies: every request is redone elsewhere, none fails.
            fakes.kill(victim)
            fake_layout.kill(victim)
            deliver(core.tick())
        elif action.startswith("encode on "):
            fakes.encode_next(action.removeprefix("encode on "))
        else:
            deliver(core.handle(fakes.outbox[action.removeprefix("from ")].popleft()))
        collect()

    assert not core.requests and core.ledger.is_empty()
    assert sorted(ended, key=int) == [str(i) for i in range(len(requests))], "every request ended"
    for rid, outs in ended.items():
        assert len(outs) == 1, f"request {rid} ended {len(outs)} times"
        check_outcome(rid, outs[0], requests[int(rid)][1], aborted)


def check_outcome(rid: str, out, tokens: int, aborted: set[str]) -> None:
    reason = out.outputs[0].finish_reason
    if rid in aborted:
        assert reason == "abort"
    else:
        assert reason == "length" and out.outputs[0].token_ids == list(range(tokens)), out
        assert out.error is None


def test_requests_waiting_for_an_image_a_dead_encoder_was_sending_get_it_from_another():
    # A's image goes to E0; B needs the same image, on its way to P for A, so nothing is sent for B.
    # E0 dies before encoding it: P asks again, E1 encodes it, and both requests finish.
    core, fake_layout, _ = make_core("2E+1P+1D")
    fakes = FakeInstances(core)

    def deliver(outgoing) -> None:
        for instance, message in outgoing:
            fakes.receive(instance, message)

    for rid in ("A", "B"):
        deliver(core.add_request(rid, prompt(6, [image("shared")]), SamplingParams(max_tokens=2)))
    assert list(fakes.encode_queue) == ["E0"] and len(fakes.encode_queue["E0"]) == 1
    fakes.kill("E0")
    fake_layout.kill("E0")
    deliver(core.tick())
    while any(fakes.outbox.values()) or any(fakes.encode_queue.values()):
        for name in sorted(fakes.encode_queue):
            while fakes.encode_queue[name]:
                fakes.encode_next(name)
        for name in sorted(fakes.outbox):
            while fakes.outbox[name]:
                deliver(core.handle(fakes.outbox[name].popleft()))
    ended = {out.request_id: out for out in core.take_outputs() if out.finished}
    for rid in ("A", "B"):
        assert ended[rid].error is None and ended[rid].outputs[0].token_ids == [0, 1]
    assert core.stats["encode_items"] == 2, "sent to E0, then again to E1"
    assert not core.requests and core.ledger.is_empty()
