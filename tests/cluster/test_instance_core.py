"""Instance cores without processes or sockets: real engines on the tiny checkpoint, a real shm
connector between them, driven message by message; what each core says lands in a `ListOutbox`.

A virtual clock that never moves keeps the periodic stats out of the outboxes, so every message a
test sees is one the core sent in answer to what the test did.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack

import pytest

from epd.clock import VirtualClock
from epd.cluster.instance import InstanceConfig, InstanceCore, ListOutbox
from epd.cluster.layout import Layout
from epd.cluster.messages import (
    DestinationGone,
    EncodeDone,
    EncodeItem,
    EncodeTask,
    PrefillTask,
    ReleaseEmbedding,
    RequestError,
    RequestUpdate,
    SetRoles,
    SetRolesReply,
    decode_for_instance,
    decode_for_router,
    encode,
)
from epd.entrypoints.async_engine import EngineArgs
from epd.sampling_params import SamplingParams
from epd.transfer.base import create_connector

WAIT_S = 60.0  # a bound on waiting for a transfer, never a guess at how long it takes
PROMPT = list(range(10, 60))
MAX_TOKENS = 5


class Cores:
    """Builds cores of one layout's instances ("P0", "D0"...) and closes their connectors."""

    def __init__(self, model: str, layout: str, stack: ExitStack) -> None:
        self.specs = {s.name: s for s in Layout.parse(layout).instances("cpu")}
        self.engine = EngineArgs(model=model, block_size=4, num_kv_blocks=256).engine_config()
        self.stack = stack

    def __call__(self, name: str) -> tuple[InstanceCore, ListOutbox]:
        cfg = InstanceConfig(self.specs[name], self.engine, "inproc://no-router", "shm")
        connector = self.stack.enter_context(create_connector("shm", device="cpu"))
        outbox = ListOutbox()
        return InstanceCore(cfg, connector, outbox, VirtualClock()), outbox


@pytest.fixture
def cores(checkpoints) -> Iterator[Callable[[str, str], tuple[InstanceCore, ListOutbox]]]:
    with ExitStack() as stack:
        yield lambda layout, name: Cores(str(checkpoints["qwen2_5_vl"]), layout, stack)(name)


def task(request_id: str, decode_dest: str | None) -> PrefillTask:
    params = SamplingParams(temperature=0, max_tokens=MAX_TOKENS, ignore_eos=True)
    return PrefillTask(request_id, PROMPT, [], [], [], params, 0.0, decode_dest)


def turn_until(core: InstanceCore, done: Callable[[], bool], what: str) -> None:
    """Turn the core (transfers in, one step) until `done`; transfers move on shm's own threads."""
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"{core.instance_id}: {what} not within {WAIT_S} s"
        core.receive_transfers()
        core.step()


def finished(outbox: ListOutbox, request_id: str) -> Callable[[], bool]:
    def done() -> bool:
        updates = [m for m in outbox.messages if isinstance(m, RequestUpdate) and m.request_id == request_id]
        return any(m.finish_reason for m in updates)

    return done


def tokens_of(messages: list, request_id: str) -> list[int]:
    """The output tokens the updates of one request add up to, checked to come in order."""
    tokens: list[int] = []
    for m in messages:
        if isinstance(m, RequestUpdate) and m.request_id == request_id:
            assert m.first_index == len(tokens), "an update skipped or repeated tokens"
            tokens += m.new_token_ids
    return tokens


def decode_here(pd: InstanceCore, outbox: ListOutbox, request_id: str) -> list[int]:
    """The tokens a PD core generates for the test prompt: the reference for hand-offs."""
    pd.on_message(task(request_id, None))
    turn_until(pd, finished(outbox, request_id), "decoding")
    return tokens_of(outbox.take(), request_id)


def hand_off(p: InstanceCore, p_out: ListOutbox, d: InstanceCore, d_out: ListOutbox, rid: str) -> list:
    """P prefills `rid` and hands it to D, which decodes it to the end; D's messages."""
    p.on_message(task(rid, d.connector.address))
    p.step()
    [first] = p_out.take()
    assert isinstance(first, RequestUpdate) and first.instance == p.instance_id
    assert first.handed_off and len(first.new_token_ids) == 1 and first.first_index == 0
    turn_until(d, finished(d_out, rid), "the hand-off and decoding")
    p.receive_transfers()  # P learns the transfer went out: nothing to tell the router
    assert p_out.take() == []
    return [first, *d_out.take()]


def test_prefill_core_hands_a_request_to_a_decode_core(cores):
    p, p_out = cores("1E+1P+1D", "P0")
    d, d_out = cores("1E+1P+1D", "D0")
    pd, pd_out = cores("1E+1PD", "PD0")
    assert p.prefill is not None and p.decode is None and d.prefill is None and d.decode is not None

    messages = hand_off(p, p_out, d, d_out, "r1")

    assert all(isinstance(m, RequestUpdate) for m in messages), messages
    assert [m.instance for m in messages] == ["P0"] + ["D0"] * (len(messages) - 1)
    assert tokens_of(messages, "r1") == decode_here(pd, pd_out, "r1"), "split decoding changed tokens"
    assert len(tokens_of(messages, "r1")) == MAX_TOKENS and messages[-1].finish_reason == "length"
    assert d.stats()["running_requests"] == 0 and d.stats()["kv_cache_usage"] == 0


def test_prefill_to_decode_on_an_idle_instance_keeps_its_engine_and_takes_a_handoff(cores):
    p, p_out = cores("1E+2P+1D", "P0")
    switched, switched_out = cores("1E+2P+1D", "P1")
    engine = switched.engine

    switched.on_message(SetRoles("D"))

    assert switched_out.take() == [SetRolesReply("P1", "D", None)]
    assert switched.engine is engine, "a P <-> D switch must keep the loaded engine"
    assert switched.instance_id == "P1" and switched.prefill is None and switched.decode is not None
    messages = hand_off(p, p_out, switched, switched_out, "r2")
    assert {m.instance for m in messages[1:]} == {"P1"} and messages[-1].finish_reason == "length"
    assert len(tokens_of(messages, "r2")) == MAX_TOKENS

    switched.on_message(SetRoles("p"))  # and back: it prefills (and hands off) again
    assert switched_out.take() == [SetRolesReply("P1", "P", None)]
    assert switched.engine is engine and switched.decode is None
    hand_off(switched, switched_out, p_decodes(p, p_out), p_out, "r3")


def p_decodes(p: InstanceCore, outbox: ListOutbox) -> InstanceCore:
    """Turn P0 into a decode instance for the way back."""
    p.on_message(SetRoles("D"))
    assert outbox.take() == [SetRolesReply("P0", "D", None)]
    return p


def test_removing_a_role_while_it_holds_a_request_is_refused(cores):
    pd, outbox = cores("1E+1PD", "PD0")
    pd.on_message(task("running", None))
    pd.step()  # the first token: the request now decodes here
    outbox.take()

    pd.on_message(SetRoles("P"))

    [reply] = outbox.take()
    assert reply == SetRolesReply("PD0", "PD", reply.error) and reply.error is not None
    assert "still holds requests" in reply.error and "engine holds 1" in reply.error
    assert pd.prefill is not None and pd.decode is not None, "a refused change must change nothing"
    turn_until(pd, finished(outbox, "running"), "decoding after the refusal")
    pd.on_message(SetRoles("P"))  # idle now: the same change goes through
    assert outbox.take()[-1] == SetRolesReply("PD0", "P", None)


def test_a_prefill_waiting_for_embeddings_holds_its_stage(cores):
    p, outbox = cores("1E+1P+1D", "P0")
    waiting = PrefillTask("img", [1, 2, 3, 4], [(1, 2)], ["hash-a"], [(1, 2, 4)], SamplingParams(), 0.0, None)
    p.on_message(waiting)
    assert [type(m).__name__ for m in outbox.take()] == ["NeedEmbeddings"]

    p.on_message(SetRoles("D"))

    [reply] = outbox.take()
    assert reply.roles == "P" and "prefill holds 1" in reply.error


@pytest.mark.parametrize(
    ("layout", "name", "roles", "says"),
    [
        ("1E+1P+1D", "D0", "ED", "adding E needs the vision tower, which it did not load"),
        ("1E+1P+1D", "P0", "EP", "adding E needs the vision tower"),
        ("1E+1P+1D", "E0", "EP", "P and D need the language model"),
        ("1E+1P+1D", "D0", "", "at least one role"),
        ("1E+1P+1D", "D0", "DX", "unknown role"),
    ],
)
def test_role_changes_the_weights_do_not_allow_are_refused(cores, layout, name, roles, says):
    core, outbox = cores(layout, name)
    before = core.roles

    core.on_message(SetRoles(roles))

    [reply] = outbox.take()
    assert isinstance(reply, SetRolesReply) and reply.instance == name
    assert says in reply.error, reply.error
    assert core.roles == before and reply.roles == name.rstrip("0123456789")


def test_work_for_a_stage_the_instance_does_not_hold_is_refused_per_request(cores):
    p, outbox = cores("1E+1P+1D", "P0")
    item = EncodeItem(0, "hash-a", (1, 2, 2), b"", 0)

    p.on_message(EncodeTask("r", [item], "nowhere"))

    assert outbox.take() == [RequestError("P0", "r", "P0 does not hold E (its roles: P)")]


def test_an_encoder_unpins_what_it_sent_to_a_consumer_that_died(cores, checkpoints):
    """Found by the chaos soak: each copy an encoder sends holds a pin until its receipt, which a
    dead prefill instance never sends; the pins stayed for ever (DestinationGone releases them)."""
    from epd.cluster.router.core import encode_item
    from epd.inputs.processor import InputProcessor
    from epd.testing.images import noise_image

    processor = InputProcessor.from_pretrained(str(checkpoints["qwen2_5_vl"]))
    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    prompts = [{"prompt": pad, "multi_modal_data": {"image": [noise_image(56, 56, seed=s)]}} for s in (1, 2)]
    one, two = (encode_item(0, processor.process_prompt(p).images[0]) for p in prompts)
    e, outbox = cores("1E+1P+1D", "E0")
    dead, live = (cores("1E+1P+1D", name)[0].connector.address for name in ("P0", "P0"))
    e.on_message(EncodeTask("a", [one], dead))
    e.on_message(EncodeTask("b", [one], live))  # rides along: one encoding, two copies, two pins
    e.step()
    assert e.stats()["images_encoded_total"] == 1 and e.stats()["mm_cache_usage"] > 0
    e.on_message(ReleaseEmbedding(one.content_hash, live))
    assert e.stats()["mm_cache_usage"] > 0, "the dead one's copy is still pinned"

    e.on_message(DestinationGone(dead))
    assert e.stats()["mm_cache_usage"] == 0
    e.on_message(ReleaseEmbedding(one.content_hash, dead))  # a late receipt: released already
    assert e.stats()["mm_cache_usage"] == 0
    # What was still queued for the dead one is not encoded at all.
    outbox.take()
    e.on_message(EncodeTask("c", [two], dead))
    e.on_message(DestinationGone(dead))
    e.step()
    assert e.stats()["images_encoded_total"] == 1 and e.stats()["mm_cache_usage"] == 0
    assert not [m for m in outbox.take() if isinstance(m, EncodeDone)]


def test_set_roles_and_its_reply_travel_as_control_messages():
    assert decode_for_instance(encode(SetRoles("PD"))) == SetRoles("PD")
    reply = SetRolesReply("P1", "D", "refused: why")
    assert decode_for_router(encode(reply)) == reply
