"""Role switches at the router, without processes: the drain, the SetRoles it sends, the reply, the
refusals; every phase timed on the harness's virtual clock."""

from __future__ import annotations

import msgspec
import pytest
from router_harness import make_core, prompt, update

from epd.cluster.layout import Role
from epd.cluster.messages import SetRoles, SetRolesReply
from epd.cluster.router import Outgoing
from epd.cluster.router.role_switch import (
    BadRoles,
    RoleSwitches,
    SwitchInProgress,
    SwitchRefused,
    SwitchState,
    UnknownInstance,
)
from epd.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=3)
BUSY = "P1 cannot change its roles from P to D: it still holds requests (engine holds 1); retry when..."


def switching(layout: str):
    core, fake, clock = make_core(layout)
    for handle in core.instances.values():  # what each loaded, as its InstanceReady says
        vision, language = int(handle.has(Role.ENCODE)), int(bool(handle.spec.roles - {Role.ENCODE}))
        handle.ready = msgspec.structs.replace(
            handle.ready, vision_parameters=vision, language_parameters=language
        )
    return core, RoleSwitches(core, drain_timeout_s=30.0), fake, clock


def test_a_switch_drains_then_reconfigures_then_rejoins_with_timed_phases():
    core, switches, _, clock = switching("1E+2P+1D")
    [(to, _)] = core.add_request("held", prompt(4), PARAMS)
    assert to == "P0"
    core.add_request("other", prompt(8), PARAMS)  # least loaded: P1
    assert core.requests["other"].prefill == "P1"
    done: list[dict] = []

    switch, out = switches.request("P1", "d", done.append)

    assert out == [] and switch.state is SwitchState.DRAINING, "P1 still holds a prefill"
    assert switches.state_of("P1") == "draining" and "P1" in core.draining
    core.add_request("new", prompt(2), PARAMS)
    assert core.requests["new"].prefill == "P0", "nothing new is placed on a draining instance"
    clock.advance(0.5)
    core.handle(update("P1", "other", [1], first_index=0))
    core.handle(update("D0", "other", [2], first_index=1, finish="length"))  # P1 holds nothing now

    assert switches.tick() == [Outgoing("P1", SetRoles("D"))]
    assert switches.state_of("P1") == "switching" and switches.tick() == []
    clock.advance(0.25)
    core.handle(SetRolesReply("P1", "D"))
    switches.on_reply(SetRolesReply("P1", "D"))

    assert switch.state is SwitchState.DONE and not switches.busy() and not core.draining
    [record] = done
    assert record["from"] == "P" and record["to"] == "D" and record["error"] is None
    phases = {"drain": 0.5, "reconfigure": 0.25, "weights": 0.0, "memory": 0.0, "rejoin": 0.0}
    assert record["timings"] == {**phases, "total": 0.75}
    assert switches.records() == [record]
    assert {i["id"]: (i["roles"], i["state"]) for i in switches.instances()} == {
        "E0": ("E", "up"),
        "P0": ("P", "up"),
        "P1": ("D", "up"),
        "D0": ("D", "up"),
    }
    core.add_request("after", prompt(2), PARAMS)
    assert core.requests["after"].decode == "P1", "P1 takes decodes now (least loaded, first)"


def test_a_refusal_while_it_finishes_its_last_transfer_is_retried():
    core, switches, _, clock = switching("1E+2P+1D")
    switch, [sent] = switches.request("P1", "D")
    assert sent == Outgoing("P1", SetRoles("D")), "idle: SetRoles goes out at once"

    core.handle(SetRolesReply("P1", "P", BUSY))
    switches.on_reply(SetRolesReply("P1", "P", BUSY))
    assert switch.state is SwitchState.DRAINING and switches.tick() == [], "retried a little later"
    clock.advance(0.01)
    assert switches.tick() == [sent]
    switches.on_reply(SetRolesReply("P1", "D"))
    assert switch.state is SwitchState.DONE and switch.attempts == 2
    assert switch.timings()["drain"] == pytest.approx(0.01)


def test_a_refusal_for_good_or_an_instance_death_ends_the_switch_with_the_old_roles():
    core, switches, fake, _ = switching("1E+2P+2D")
    refused, _ = switches.request("P1", "D")
    switches.on_reply(SetRolesReply("P1", "P", "P1 cannot change its roles from P to D: something else"))
    assert refused.state is SwitchState.FAILED and "something else" in refused.error

    core.add_request("r", prompt(4), PARAMS)
    died, _ = switches.request("D0", "P")
    assert died.state is SwitchState.DRAINING and core.requests["r"].decode == "D0"
    fake.kill("D0")
    core.tick()  # the router notices; the request continues elsewhere
    switches.tick()
    assert died.state is SwitchState.FAILED and died.error == "the instance died during the switch"
    assert not core.draining and switches.state_of("D0") == "down"
    assert [r["state"] for r in switches.records()] == ["failed", "failed"]


def test_a_drain_that_never_ends_times_out():
    core, switches, _, clock = switching("1E+1P+2D")
    core.add_request("forever", prompt(4), PARAMS)
    switch, _ = switches.request("D0", "P")
    clock.advance(31)
    assert switches.tick() == []
    assert switch.state is SwitchState.FAILED and "after 30 s of draining" in switch.error
    assert "D0" not in core.draining


@pytest.mark.parametrize(
    ("layout", "name", "roles", "error", "says"),
    [
        ("1E+2P+1D", "X9", "D", UnknownInstance, "no instance 'X9'"),
        ("1E+2P+1D", "P1", "DQ", BadRoles, "unknown role"),
        ("1E+2P+1D", "P1", "", BadRoles, "at least one role"),
        ("1E+2P+1D", "P0", "EP", SwitchRefused, "adding E needs the vision tower"),
        ("1E+2P+1D", "E0", "P", SwitchRefused, "removing E is not supported"),
        ("2EP+1D", "EP0", "ED", SwitchRefused, "only P and D move"),
        ("1E+1P+1D", "P0", "D", SwitchRefused, "no other live instance takes P while it drains"),
        ("1E+1P+1D", "P0", "PD", SwitchRefused, "no other live instance takes P"),
        ("1E+2PD", "PD0", "P", None, None),
    ],
)
def test_switches_that_cannot_start_change_nothing(layout, name, roles, error, says):
    core, switches, _, _ = switching(layout)
    if error is None:
        switch, _ = switches.request(name, roles)
        assert switch.state is SwitchState.RECONFIGURING
        return
    with pytest.raises(error, match=says):
        switches.request(name, roles)
    assert not core.draining and not switches.busy()


def test_a_second_switch_of_the_same_instance_is_refused_while_the_first_runs():
    core, switches, _, _ = switching("1E+2P+2D")
    core.add_request("r", prompt(4), PARAMS)
    switches.request("D0", "P")
    with pytest.raises(SwitchInProgress, match="D0 is already switching from D to P"):
        switches.request("D0", "PD")
    with pytest.raises(SwitchRefused, match="no other live instance takes D"):
        switches.request("D1", "P")  # D0 drains: D1 is the only D left


def test_the_same_roles_again_is_done_at_once():
    _, switches, _, _ = switching("1E+2P+1D")
    switch, out = switches.request("P1", "p")
    assert out == [] and switch.state is SwitchState.DONE and switch.timings()["total"] == 0.0
    assert switches.records() == [], "nothing switched: nothing to count"
