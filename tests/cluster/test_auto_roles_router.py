"""The policy wired to a router core (auto_driver.py): what it reads of the ledger, the switch it starts
through RoleSwitches (marked automatic, with its reason), and never a second one while one runs."""

from __future__ import annotations

from router_harness import make_core, prompt, update

from epd.cluster.messages import SetRoles, SetRolesReply
from epd.cluster.router import Outgoing
from epd.cluster.router.auto_driver import AutoRoleSwitching
from epd.cluster.router.auto_load import UnitCosts
from epd.cluster.router.auto_roles import AutoRoles, AutoRolesConfig, DrainScorer
from epd.cluster.router.role_switch import RoleSwitches, SwitchState
from epd.sampling_params import SamplingParams

UNITS = UnitCosts(patch_s=1e-4, prefill_token_s=1e-3, decode_token_s=1e-2)
CONFIG = AutoRolesConfig(dwell_s=10.0, interval_s=1.0, min_requests=2, trigger_s=0.5)
LONG = SamplingParams(max_tokens=200)


def driven(background: bool = False):
    core, fake, clock = make_core("1E+2P+1D")
    switches = RoleSwitches(core, drain_timeout_s=60.0)
    policy = AutoRoles(CONFIG, DrainScorer(UNITS), UNITS)
    return core, switches, AutoRoleSwitching(core, switches, policy, background), clock


def add(core, auto, rid: str, params: SamplingParams = LONG) -> None:
    core.add_request(rid, prompt(4), params)
    auto.note_request(core.requests[rid].prompt, params)


def decoding(core, rid: str) -> None:
    """Its first token from P, its second from D: the KV landed, P holds nothing of it any more."""
    core.handle(update(core.requests[rid].prefill, rid, [1], first_index=0))
    core.handle(update("D0", rid, [2], first_index=1))


def test_the_view_counts_tokens_left_to_decode_and_prompt_tokens_to_prefill():
    core, _, auto, _ = driven()
    add(core, auto, "a")
    add(core, auto, "b")
    decoding(core, "a")
    work = {i.name: dict(i.work) for i in auto.view().instances}
    assert work["D0"] == {"D": 198 + 200}, "a has 198 tokens left, b all 200"
    assert work["P0"] == {} and work["P1"] == {"P": 4}, "b is not prefilled yet"
    assert [r.params.max_tokens for r in auto.view().recent] == [200, 200]


def test_a_decode_backlog_starts_one_automatic_switch_and_no_second():
    core, switches, auto, clock = driven()
    for rid in ("a", "b", "c"):
        add(core, auto, rid)
    for rid in ("a", "b", "c"):  # every prefill is done, 3 x 198 tokens to decode
        decoding(core, rid)

    first = auto.tick()

    assert first == [Outgoing("P0", SetRoles("D"))], "P0 holds nothing: SetRoles goes out at once"
    assert switches.state_of("P0") == "switching" and dict(auto.started) == {"decode": 1}
    for _ in range(5):  # time passes, the backlog stays: the switch under way blocks another
        clock.advance(2.0)
        assert auto.tick() == []
    assert list(switches.active) == ["P0"]
    reply = SetRolesReply("P0", "D")
    core.handle(reply)
    switches.on_reply(reply)
    [record] = switches.records()
    assert (record["trigger"], record["reason"], record["state"]) == ("auto", "decode", "done")
    assert (record["from"], record["to"]) == ("P", "D")


def test_in_the_background_the_decision_is_applied_by_a_later_tick():
    core, switches, auto, _ = driven(background=True)
    try:
        for rid in ("a", "b", "c"):
            add(core, auto, rid)
            decoding(core, rid)
        assert auto.tick() == [], "the look runs on the policy's thread"
        assert auto._pending is not None
        auto._pending.result(timeout=60)  # wait for the look to end: a state, not a duration
        assert auto.tick() == [Outgoing("P0", SetRoles("D"))]
        assert switches.active["P0"].state is SwitchState.RECONFIGURING
    finally:
        auto.close()


def test_a_decision_overtaken_by_a_switch_by_hand_is_dropped():
    core, switches, auto, _ = driven(background=True)
    try:
        for rid in ("a", "b", "c"):
            add(core, auto, rid)
            decoding(core, rid)
        auto.tick()
        auto._pending.result(timeout=60)
        switches.request("P0", "PD")  # by hand, meanwhile: the policy's P0 -> D cannot start now
        assert auto.tick() == [] and not auto.started
        assert switches.active["P0"].trigger == "admin"
    finally:
        auto.close()


def test_automatic_switches_are_counted_apart_with_their_reason():
    """/metrics: every switch in epd_role_switches_total; the automatic ones also by reason."""
    from epd.server.metrics import ServerMetrics

    core, switches, auto, _ = driven()
    for rid in ("a", "b", "c"):
        add(core, auto, rid)
        decoding(core, rid)
    for instance, roles, start in (("P1", "PD", switches.request), ("P0", "D", None)):
        if start is not None:
            start(instance, roles)  # by hand, first: P1 is idle, SetRoles goes out at once
        else:
            assert auto.tick() == [Outgoing(instance, SetRoles(roles))], "then the policy's own"
        reply = SetRolesReply(instance, roles)
        core.handle(reply)
        switches.on_reply(reply)

    text = ServerMetrics(dict, dict, lambda: 0, switches.records).render().decode()

    assert 'epd_role_switches_total{from_roles="P",outcome="done",to_roles="PD"} 1.0' in text
    assert 'epd_role_switches_total{from_roles="P",outcome="done",to_roles="D"} 1.0' in text
    auto_lines = [line for line in text.splitlines() if line.startswith("epd_role_switches_auto_total")]
    assert auto_lines == [
        'epd_role_switches_auto_total{from_roles="P",outcome="done",reason="decode",to_roles="D"} 1.0'
    ]
