"""Moving a draining instance's running decodes, at the router, without processes: which requests
move and where, what the ledger holds on both ends until the new D reports a token, a refusal, and
the death of either end mid-move (the request continues through recovery)."""

from __future__ import annotations

import msgspec
from router_harness import data_address, make_core, prompt, update

from epd.cluster.layout import Role
from epd.cluster.messages import AbortRequest, MigrateRequest, MigrationRefused, PrefillTask, SetRoles
from epd.cluster.router import Outgoing
from epd.cluster.router.core import MIGRATION_SOURCE
from epd.cluster.router.ledger import Work
from epd.cluster.router.role_switch import RoleSwitches, SwitchState
from epd.sampling_params import SamplingParams

PARAMS = SamplingParams(max_tokens=50)


def decoding(layout: str = "1E+1P+2D"):
    """A core with request "r" decoding on D0 (two tokens in) and "waits" placed on D1, no token yet."""
    core, fake, clock = make_core(layout)
    for handle in core.instances.values():
        handle.ready = msgspec.structs.replace(handle.ready, language_parameters=1)
    core.add_request("r", prompt(4), PARAMS)
    assert core.requests["r"].decode == "D0"
    core.handle(update("P0", "r", [7], first_index=0))
    core.handle(update("D0", "r", [8], first_index=1))
    core.add_request("waits", prompt(4), PARAMS)
    assert core.requests["waits"].decode == "D1"
    return core, RoleSwitches(core, drain_timeout_s=30.0), fake


def held(core, rid: str) -> dict[tuple, str]:
    works = core.ledger.outstanding().items()
    return {(w.stage.value, w.item): instance for w, (instance, _) in works if w.request_id == rid}


def test_a_running_decode_moves_and_the_drain_ends_when_it_landed():
    core, switches, _ = decoding()
    switch, out = switches.request("D0", "P")

    assert out == [Outgoing("D0", MigrateRequest("r", data_address("D1")))]
    assert held(core, "r") == {("D", 0): "D1", ("D", MIGRATION_SOURCE): "D0"}
    assert core.requests["r"].decode == "D1" and switch.migrated == 1
    assert switches.tick() == [], "it waits for the move; nothing is sent twice"
    core.handle(update("D0", "r", [9], first_index=2))  # D0's last tokens, sent as it let go
    assert switches.tick() == [] and core.ledger.load("D0") == 1

    core.handle(update("D1", "r", [10], first_index=3))  # the KV landed: D1 goes on
    assert held(core, "r") == {("D", 0): "D1"}
    assert switches.tick() == [Outgoing("D0", SetRoles("P"))]
    assert core.requests["r"].token_ids == [7, 8, 9, 10]


def test_a_request_without_a_token_from_its_d_is_not_moved_yet():
    core, switches, _ = decoding()
    core.add_request("later", prompt(4), PARAMS)  # placed on D0 (least loaded with D1's "waits")
    assert core.requests["later"].decode == "D0"
    _, out = switches.request("D0", "P")
    assert [m.message.request_id for m in out] == ["r"], "'later' has no KV on D0 yet"
    core.handle(update("P0", "later", [1], first_index=0))
    assert switches.tick() == [], "P's token: the KV is on its way to D0, not there"
    core.handle(update("D0", "later", [2], first_index=1))
    assert switches.tick() == [Outgoing("D0", MigrateRequest("later", data_address("D1")))]


def test_a_refused_move_is_undone_and_the_request_ends_where_it_is():
    core, switches, _ = decoding()
    switch, _ = switches.request("D0", "P")
    core.handle(MigrationRefused("D0", "r", "cannot migrate: its KV is not here (to be recomputed)"))

    assert held(core, "r") == {("D", 0): "D0"} and core.requests["r"].decode == "D0"
    assert switch.migrated == 0 and switches.tick() == [], "not asked again"
    core.handle(update("D0", "r", [9], first_index=2, finish="length"))
    assert switches.tick() == [Outgoing("D0", SetRoles("P"))]


def test_the_death_of_the_draining_instance_mid_move_continues_the_request():
    core, switches, fake = decoding()
    switch, _ = switches.request("D0", "P")
    fake.kill("D0")
    out = core.tick()
    switches.tick()

    assert switch.state is SwitchState.FAILED
    record = core.requests["r"]
    assert record.attempt == 1 and record.stage.value == "resuming"
    assert Outgoing("D1", AbortRequest("r")) in out, "D1 drops the KV if it still comes"
    [task] = [m.message for m in out if isinstance(m.message, PrefillTask)]
    assert task.output_token_ids == [7, 8] and record.decode == "D1"


def test_the_death_of_the_new_decoder_mid_move_continues_the_request():
    core, switches, fake = decoding("1E+1P+3D")
    switches.request("D0", "P")
    target = core.requests["r"].decode
    fake.kill(target)
    out = core.tick()

    record = core.requests["r"]
    assert record.attempt == 1 and record.decode not in (target, "D0")
    assert any(isinstance(m.message, PrefillTask) for m in out)
    assert core.ledger.holder(Work("r", Role.DECODE, MIGRATION_SOURCE)) is None
