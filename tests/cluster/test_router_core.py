"""The router core without processes: real messages in, the messages it returns checked one by one."""

from __future__ import annotations

import re

import pytest
from router_harness import arrived, encode_done, image, make_core, need, prompt, update

from epd.cluster.layout import Role
from epd.cluster.messages import (
    AbortRequest,
    DestinationGone,
    EmbeddingsEvicted,
    EmbeddingsLost,
    EncodeTask,
    InstanceFailed,
    PrefillTask,
    ReleaseEmbedding,
    RequestError,
    SetRolesReply,
)
from epd.cluster.router import IllegalTransition, Outgoing, Stage
from epd.cluster.router.ledger import Work
from epd.cluster.router.lifecycle import Trigger
from epd.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=3)


def two_image_request(core, rid: str = "r", names: tuple[str, str] = ("small", "big")) -> list[Outgoing]:
    # The larger image goes first onto the emptier encoder, the other onto the second one (IRP).
    return core.add_request(rid, prompt(8, [image(names[0], 2), image(names[1], 4)]), PARAMS)


def placed_with_images_on_p(core, rid: str = "r") -> None:
    """A two-image request whose images P reported holding: nothing to encode, it stays PLACED."""
    for content_hash in ("small", "big"):
        core.handle(arrived("P0", content_hash, "E0", []))
    [(to, task)] = two_image_request(core, rid)
    assert to == "P0" and task.encoding == []


def test_a_request_through_1p_1d_and_two_encoders_message_by_message():
    core, _, clock = make_core("2E+1P+1D")
    (to, task), *out = two_image_request(core)
    assert to == "P0" and isinstance(task, PrefillTask)
    assert task.decode_dest == "data://D0" and task.pixels is None and task.image_hashes == ["small", "big"]
    assert task.encoding == [0, 1], "both are being encoded: P must not ask for them"

    # The images go to the encoders with the task, not after P asks.
    assert {to for to, _ in out} == {"E0", "E1"} and all(isinstance(m, EncodeTask) for _, m in out)
    by_encoder = {to: [item.content_hash for item in m.items] for to, m in out}
    assert by_encoder == {"E0": ["big"], "E1": ["small"]}
    assert all(m.dest == "data://P0" for _, m in out)
    assert core.requests["r"].stage is Stage.ENCODING
    assert core.ledger.outstanding() == {
        Work("r", Role.PREFILL): ("P0", 8),
        Work("r", Role.DECODE): ("D0", 1),
        Work("r", Role.ENCODE, 0): ("E1", 4),
        Work("r", Role.ENCODE, 1): ("E0", 16),
    }

    assert core.handle(encode_done("E0", "r", [1])) == []
    assert core.requests["r"].stage is Stage.ENCODING, "the small image is still out"
    assert core.handle(arrived("P0", "big", "E0", ["r"])) == [
        Outgoing("E0", ReleaseEmbedding("big", "data://P0"))
    ]
    assert core.handle(encode_done("E1", "r", [0])) == []
    assert core.requests["r"].stage is Stage.PREFILLING
    assert core.handle(arrived("P0", "small", "E1", ["r"])) == [
        Outgoing("E1", ReleaseEmbedding("small", "data://P0"))
    ]

    # D overtakes P: its token 1 arrives before P's first token and waits for it.
    assert core.handle(update("D0", "r", [11], first_index=1)) == []
    assert core.take_outputs() == [] and core.requests["r"].stage is Stage.PREFILLING
    clock.advance(0.5)
    assert core.handle(update("P0", "r", [10], first_index=0)) == []
    assert core.requests["r"].stage is Stage.DECODING
    [out] = core.take_outputs()
    assert out.outputs[0].token_ids == [10, 11] and not out.finished
    assert out.metrics.first_token_time == 1000.5
    assert core.ledger.outstanding() == {Work("r", Role.DECODE): ("D0", 1)}, "prefill released"

    assert core.handle(update("D0", "r", [12], first_index=2, finish="length")) == []
    [out] = core.take_outputs()
    assert (
        out.finished and out.outputs[0].token_ids == [10, 11, 12] and out.outputs[0].finish_reason == "length"
    )
    assert out.outputs[0].text == "done"
    assert not core.has_unfinished() and core.ledger.is_empty()


def test_an_instance_that_encodes_in_process_gets_the_pixels_and_never_asks():
    core, _, _ = make_core("1EP+1D")
    [(to, task)] = core.add_request("r", prompt(8, [image("a")]), PARAMS)
    assert to == "EP0" and [item.content_hash for item in task.pixels] == ["a"] and task.encoding == []
    core.handle(update("EP0", "r", [1], first_index=0))
    assert core.requests["r"].stage is Stage.DECODING
    core.handle(update("D0", "r", [2], first_index=1, finish="stop"))
    assert not core.requests and core.ledger.is_empty()


def test_a_prefill_instance_that_decodes_keeps_the_request():
    core, _, _ = make_core("1E+1PD")
    [(to, task)] = core.add_request("r", prompt(4), PARAMS)
    assert to == "PD0" and task.decode_dest is None
    core.handle(update("PD0", "r", [1], first_index=0))
    assert core.requests["r"].stage is Stage.DECODING
    assert core.ledger.outstanding() == {Work("r", Role.DECODE): ("PD0", 1)}
    core.handle(update("PD0", "r", [2, 3], first_index=1, finish="length"))
    [out] = core.take_outputs()
    assert out.outputs[0].token_ids == [1, 2, 3] and core.ledger.is_empty()


def test_first_token_before_the_last_encode_done_and_the_late_one_after_the_end():
    core, _, _ = make_core("2E+1P+1D")
    two_image_request(core)
    core.handle(encode_done("E0", "r", [1]))
    core.handle(update("P0", "r", [10], first_index=0))  # E1's report is still on its way
    assert core.requests["r"].stage is Stage.DECODING
    assert core.handle(encode_done("E1", "r", [0])) == []
    assert core.requests["r"].stage is Stage.DECODING
    core.handle(update("D0", "r", [11], first_index=1, finish="stop"))
    assert core.handle(encode_done("E1", "r", [0])) == [], "ended: ignored"
    assert core.handle(update("D0", "r", [12], first_index=2)) == [] and core.take_outputs()[0].finished
    assert core.ledger.is_empty()


# ---- abort at each stage -----------------------------------------------------------------------


def drive_to(core, stage: Stage) -> None:
    if stage is Stage.PLACED:
        placed_with_images_on_p(core)
        return
    two_image_request(core)
    if stage is Stage.ENCODING:
        return
    core.handle(encode_done("E0", "r", [1]))
    core.handle(encode_done("E1", "r", [0]))
    if stage is Stage.PREFILLING:
        return
    core.handle(update("P0", "r", [10], first_index=0))


@pytest.mark.parametrize("stage", [Stage.PLACED, Stage.ENCODING, Stage.PREFILLING, Stage.DECODING])
def test_abort_at_each_stage_tells_p_and_d_and_releases_everything(stage):
    core, _, _ = make_core("2E+1P+1D")
    drive_to(core, stage)
    assert core.requests["r"].stage is stage
    core.take_outputs()
    assert core.abort("r") == [Outgoing("D0", AbortRequest("r")), Outgoing("P0", AbortRequest("r"))]
    [out] = core.take_outputs()
    assert out.finished and out.outputs[0].finish_reason == "abort" and out.error is None
    assert not core.requests and core.ledger.is_empty()
    # Whatever the instances had sent already arrives late and changes nothing.
    for late in (encode_done("E0", "r", [1]), update("P0", "r", [10], 0), update("D0", "r", [11], 1)):
        assert core.handle(late) == []
    assert core.take_outputs() == [] and core.abort("r") == []


def test_an_instance_error_fails_the_request():
    core, _, _ = make_core("2E+1P+1D")
    drive_to(core, Stage.DECODING)
    out = core.handle(RequestError("D0", "r", "KV transfer failed"))
    assert out == [Outgoing("D0", AbortRequest("r")), Outgoing("P0", AbortRequest("r"))]
    [result] = core.take_outputs()
    assert result.outputs[0].finish_reason == "error" and result.error == "D0: KV transfer failed"
    assert core.ledger.is_empty()


# ---- dead instances ----------------------------------------------------------------------------


def test_requests_without_a_token_start_over_when_their_decode_instance_dies():
    core, fake, _ = make_core("1E+1P+2D")
    for rid in "abcd":
        core.add_request(rid, prompt(4), PARAMS)
    on_d1 = {rid for rid, r in core.requests.items() if r.decode == "D1"}
    assert on_d1 == {"b", "d"}, "least loaded: alternating"
    fake.kill("D1")
    out = core.tick()
    # P0 drops the old attempt and gets a new one, decoding on D0; D1 reads nothing.
    assert [(to, type(m).__name__, m.request_id) for to, m in out] == [
        ("P0", "AbortRequest", "b"),
        ("P0", "PrefillTask", "b~1"),
        ("P0", "AbortRequest", "d"),
        ("P0", "PrefillTask", "d~1"),
    ]
    assert all(m.decode_dest == "data://D0" for _, m in out if isinstance(m, PrefillTask))
    assert core.take_outputs() == [] and set(core.requests) == set("abcd")
    assert core.stats["retries"] == 2 and not core.instances["D1"].alive

    # What an instance still says about the old attempt changes nothing.
    assert core.handle(update("P0", "b", [7], first_index=0)) == [] and core.take_outputs() == []
    core.handle(update("P0", "b~1", [1], first_index=0))
    core.handle(update("D0", "b~1", [2, 3], first_index=1, finish="length"))
    [out] = [o for o in core.take_outputs() if o.finished]
    assert out.request_id == "b" and out.outputs[0].token_ids == [1, 2, 3] and out.error is None
    assert core.ledger.instances_of("d") == {"P0", "D0"}
    [(to, _)] = core.add_request("e", prompt(4), PARAMS)
    assert core.requests["e"].decode == "D0", "new requests avoid the dead one"
    assert core.tick() == []


def test_a_request_a_dead_decode_instance_was_decoding_continues_from_its_tokens():
    core, fake, _ = make_core("1E+1P+2D")
    for rid in "ab":
        core.add_request(rid, prompt(4), PARAMS)
        core.handle(update("P0", rid, [1], first_index=0))
    assert core.ledger.holder(Work("b", Role.PREFILL)) == "P0", "held until D has the KV"
    core.handle(update("D1", "b", [2], first_index=1))
    assert core.ledger.holder(Work("b", Role.PREFILL)) is None
    assert core.requests["b"].decode == "D1" and core.requests["b"].stage is Stage.DECODING
    core.take_outputs()
    fake.kill("D1")
    abort, (to, task) = core.tick()
    assert abort == Outgoing("P0", AbortRequest("b")) and to == "P0"
    assert task.request_id == "b~1" and task.output_token_ids == [1, 2] and task.decode_dest == "data://D0"
    assert core.take_outputs() == [] and core.requests["b"].stage is Stage.RESUMING
    core.handle(update("D1", "b", [9], first_index=2))  # fenced: D1 is down
    core.handle(update("P0", "b~1", [3], first_index=2))
    core.handle(update("D0", "b~1", [4], first_index=3, finish="length"))
    [out] = [o for o in core.take_outputs() if o.finished]
    assert out.request_id == "b" and out.outputs[0].token_ids == [1, 2, 3, 4] and out.error is None


def test_a_dead_prefill_instance_whose_kv_never_reached_d_continues_the_request():
    core, fake, _ = make_core("1E+2P+1D")
    core.add_request("r", prompt(4), PARAMS)
    core.handle(update("P0", "r", [1], first_index=0))  # its first token; the KV is on its way to D0
    fake.kill("P0")
    abort, (to, task), gone = core.tick()
    assert abort == Outgoing("D0", AbortRequest("r")), "D0 drops the hand-off if it still comes"
    assert gone == Outgoing("E0", DestinationGone("data://P0")), "E0 unpins what P0 never confirmed"
    assert to == "P1" and task.output_token_ids == [1] and task.request_id == "r~1"


def test_a_continuation_whose_new_prefill_instance_lacks_the_images_has_them_encoded():
    """Found by the chaos test: the new P lacked the image, and sending it to encode raised
    IllegalTransition out of tick() (need_images in stage decoding), taking the router down."""
    core, fake, _ = make_core("1E+2P+1D")
    core.add_request("r", prompt(8, [image("a")]), PARAMS)
    core.handle(encode_done("E0", "r", [0]))
    core.handle(update("P0", "r", [1], first_index=0))
    fake.kill("P0")
    abort, (to, task), (encoder, encode), _ = core.tick()
    assert to == "P1" and task.output_token_ids == [1] and task.encoding == [0]
    assert encoder == "E0" and isinstance(encode, EncodeTask) and encode.dest == "data://P1"
    assert core.requests["r"].stage is Stage.RESUMING
    core.handle(encode_done("E0", "r~1", [0]))
    assert encode_tasks(core.handle(need("P1", "r~1", [0]))) == {"E0": ["a"]}, "P1 lost it: asks again"
    core.handle(encode_done("E0", "r~1", [0]))
    core.handle(update("P1", "r~1", [2], first_index=1))
    assert core.requests["r"].stage is Stage.DECODING
    core.handle(update("D0", "r~1", [3], first_index=2, finish="length"))
    [out] = [o for o in core.take_outputs() if o.finished]
    assert out.outputs[0].token_ids == [1, 2, 3] and out.error is None and core.ledger.is_empty()


def test_a_request_that_keeps_losing_instances_fails_after_max_attempts():
    core, fake, _ = make_core("1E+1P+4D")
    core.add_request("r", prompt(4), PARAMS)
    for attempt, decode in enumerate(("D0", "D1", "D2")):
        assert core.requests["r"].decode == decode and core.requests["r"].attempt == attempt
        fake.kill(decode)
        core.tick()
    [failed] = core.take_outputs()
    assert failed.error == "instance D2 failed (its process died)" and core.ledger.is_empty()
    assert core.requests == {} and core.stats["retries"] == 2, "3 attempts at most"


def test_a_dead_prefill_instance_sends_its_requests_and_their_images_elsewhere():
    core, fake, _ = make_core("1E+2P+1D")
    (to, task), *encodes = two_image_request(core)
    assert to == "P0" and len(encodes) == 1
    core.handle(encode_done("E0", "r", [0, 1]))
    fake.kill("P0")
    abort, (to, task), *encodes, gone = core.tick()
    assert abort == Outgoing("D0", AbortRequest("r")), "D0 forgets the old attempt"
    assert gone == Outgoing("E0", DestinationGone("data://P0"))
    assert to == "P1" and task.request_id == "r~1" and task.encoding == [0, 1]
    assert [(e, m.request_id, m.dest) for e, m in encodes] == [("E0", "r~1", "data://P1")]
    assert core.requests["r"].stage is Stage.ENCODING
    # The dead P's first token, sent before it died, arrives late: ignored.
    core.handle(update("P0", "r", [9], first_index=0))
    core.handle(encode_done("E0", "r~1", [0, 1]))
    core.handle(update("P1", "r~1", [1], first_index=0))
    core.handle(update("D0", "r~1", [2, 3], first_index=1, finish="length"))
    [out] = [o for o in core.take_outputs() if o.finished]
    assert out.outputs[0].token_ids == [1, 2, 3] and out.error is None and core.ledger.is_empty()


def test_a_dead_encoder_fails_nothing_its_images_are_asked_for_again():
    core, _, _ = make_core("2E+1P+1D")
    two_image_request(core, "done_on_e1")
    core.handle(encode_done("E1", "done_on_e1", [0]))  # its E1 image is encoded: nothing left there
    out = two_image_request(core, "waits_on_e1", ("small2", "big2"))
    assert any(to == "E1" for to, _ in out)
    core.add_request("no_images", prompt(4), PARAMS)
    out = core.handle(InstanceFailed("E1", "Traceback ...\nRuntimeError: CUDA error\n"))
    # Nothing E1 was sending is counted on any more, not even "small": it was encoded, but P
    # has not reported it, so it may have died with E1. P's requests waiting for them ask again.
    assert out == [Outgoing("P0", EmbeddingsLost(["small", "big2"]))]
    assert core.take_outputs() == [] and set(core.requests) == {"done_on_e1", "waits_on_e1", "no_images"}
    assert core.ledger.instances_of("waits_on_e1") == {"P0", "D0", "E0"}, "E1's reservation released"
    out = core.handle(need("P0", "waits_on_e1", [1]))
    assert encode_tasks(out) == {"E0": ["big2"]}


def test_images_without_a_live_encoder_fail_the_request():
    core, fake, _ = make_core("1E+1P+1D")
    core.handle(arrived("P0", "a", "E0", []))
    core.add_request("r", prompt(8, [image("a")]), PARAMS)  # P holds "a": nothing sent to encode
    fake.kill("E0")
    core.tick()
    # P evicted "a" meanwhile and asks for it: no encoder is left.
    assert core.handle(need("P0", "r", [0])) == [
        Outgoing("D0", AbortRequest("r")),
        Outgoing("P0", AbortRequest("r")),
    ]
    [out] = core.take_outputs()
    assert out.error == "no live encoder instance to encode this request's images"
    assert core.ledger.is_empty()
    # Found at arrival, a request is failed before any instance hears of it.
    assert core.add_request("s", prompt(8, [image("b")]), PARAMS) == []
    [out] = core.take_outputs()
    assert out.error == "no live encoder instance to encode this request's images" and core.ledger.is_empty()


def test_without_an_encoder_a_request_starts_over_where_the_vision_tower_is():
    core, fake, _ = make_core("1E+1P+1EP+1D")
    core.handle(arrived("P0", "a", "E0", []))
    core.ledger.reserve(Work("other", Role.PREFILL), "EP0", 1000)  # EP0 busy: "r" goes to P0
    [(to, _)] = core.add_request("r", prompt(8, [image("a")]), PARAMS)  # P0 holds "a"
    assert to == "P0"
    fake.kill("E0")
    core.tick()
    # P0 evicted "a" meanwhile and asks for it: no encoder is left, but EP0 encodes in-process.
    out = core.handle(need("P0", "r", [0]))
    tasks = [(to, m) for to, m in out if isinstance(m, PrefillTask)]
    assert [to for to, _ in tasks] == ["EP0"] and tasks[0][1].pixels, "the pixels go with the task"
    assert core.requests["r"].attempt == 1 and core.stats["retries"] == 1
    # New requests with images go there too; text-only ones anywhere.
    [(to, task)] = core.add_request("s", prompt(8, [image("b")]), PARAMS)
    assert to == "EP0" and task.pixels


# ---- what is a bug -----------------------------------------------------------------------------


def _failed_alone(core, message, match: str) -> None:
    """A message that breaks a request's lifecycle fails that request, not the router."""
    core.add_request("other", prompt(4), PARAMS)
    core.handle(message)
    [out] = [o for o in core.take_outputs() if o.request_id == "r"]
    assert out.finished and out.outputs[0].finish_reason == "error"
    assert re.search(match, out.error), out.error
    assert "r" not in core.requests and "other" in core.requests


def test_an_encode_done_before_any_image_was_asked_for_is_a_bug():
    core, _, _ = make_core("2E+1P+1D")
    placed_with_images_on_p(core)
    with pytest.raises(IllegalTransition, match="image_encoded in stage placed"):
        core.requests["r"].advance(Trigger.IMAGE_ENCODED)
    _failed_alone(core, encode_done("E0", "r", [1]), "internal error: .*image_encoded in stage placed")


def test_asking_for_images_after_the_first_token_is_a_bug():
    core, _, _ = make_core("2E+1P+1D")
    drive_to(core, Stage.DECODING)
    _failed_alone(core, need("P0", "r", [0]), "internal error: .*need_images in stage decoding")


def test_a_request_id_in_use_or_a_prompt_too_long_is_refused():
    core, _, _ = make_core("1E+1P+1D")
    core.add_request("r", prompt(4), PARAMS)
    with pytest.raises(ValueError, match="already in use"):
        core.add_request("r", prompt(4), PARAMS)
    with pytest.raises(ValueError, match="maximum is 4095"):
        core.add_request("long", prompt(4096), PARAMS)


# ---- what P holds: images are sent to encode at arrival, once ----------------------------------


def encode_tasks(out: list[Outgoing]) -> dict[str, list[str]]:
    """Encoder -> content hashes it was sent, from what a call returned."""
    tasks: dict[str, list[str]] = {}
    for to, message in out:
        if isinstance(message, EncodeTask):
            tasks.setdefault(to, []).extend(item.content_hash for item in message.items)
    return tasks


def test_an_image_p_holds_or_is_getting_is_not_encoded_again_until_evicted():
    core, _, _ = make_core("1E+1P+1D")
    out = core.add_request("a", prompt(8, [image("x"), image("y"), image("x")]), PARAMS)
    assert encode_tasks(out) == {"E0": ["x", "y"]}, "a repeat within the request rides along"
    assert out[0].message.encoding == [0, 1]
    out = core.add_request("b", prompt(8, [image("x")]), PARAMS)
    assert encode_tasks(out) == {} and out[0].message.encoding == [], "on its way to P for a"
    assert core.requests["b"].stage is Stage.PLACED
    core.handle(arrived("P0", "x", "E0", ["a", "b"]))
    out = core.add_request("c", prompt(8, [image("x")]), PARAMS)
    assert encode_tasks(out) == {}, "cached on P"
    core.handle(EmbeddingsEvicted("P0", ["x"]))
    out = core.add_request("d", prompt(8, [image("x")]), PARAMS)
    assert encode_tasks(out) == {"E0": ["x"]} and out[0].message.encoding == [0]


def test_p_asking_for_an_image_the_router_thought_it_held_gets_it_at_any_stage_before_the_first_token():
    core, _, _ = make_core("2E+1P+1D")
    core.handle(arrived("P0", "small", "E0", []))  # the view: P holds "small", not "big"
    (_, task), *out = two_image_request(core)
    assert task.encoding == [1] and encode_tasks(out) == {"E0": ["big"]}
    core.handle(encode_done("E0", "r", [1]))
    assert core.requests["r"].stage is Stage.PREFILLING
    out = core.handle(need("P0", "r", [0]))  # P had evicted "small" before the task came
    assert encode_tasks(out) == {"E0": ["small"]} and core.requests["r"].stage is Stage.ENCODING
    core.handle(encode_done("E0", "r", [0]))
    core.handle(update("P0", "r", [1], first_index=0))
    core.handle(update("D0", "r", [2, 3], first_index=1, finish="length"))
    assert core.take_outputs()[-1].outputs[0].token_ids == [1, 2, 3] and core.ledger.is_empty()


def test_an_instance_keeps_its_name_when_its_roles_change_and_placement_follows_the_roles():
    core, _, _ = make_core("1E+1P+1D")
    assert core.handle(SetRolesReply("D0", "PD")) == []
    assert core.instances["D0"].has(Role.PREFILL) and core.instances["D0"].name == "D0"
    placed = {
        core.requests[rid].prefill for rid in "ab" if not core.add_request(rid, prompt(4), PARAMS) == []
    }
    assert placed == {"P0", "D0"}, "least loaded over both prefill instances"
    core.handle(SetRolesReply("P0", "P", error="busy"))  # a refusal: the roles it still holds
    assert core.instances["P0"].has(Role.PREFILL)
