"""The automatic role-switching policy on synthetic stats sequences and a virtual clock: where it
moves an instance, and the guards that keep it from flapping or breaking the layout.

Scored by `DrainScorer` (the estimator's drain times), so each expected move follows from the work
in the view and the unit costs below: decode tokens cost 10x prefill tokens."""

from __future__ import annotations

import pytest

from epd.cluster.router.auto_load import (
    ClusterView,
    InstanceView,
    RecentRequest,
    UnitCosts,
    layout_after,
    legal_moves,
    stage_loads,
)
from epd.cluster.router.auto_roles import AutoRoles, AutoRolesConfig, DrainScorer, PolicyState
from epd.inputs.types import ProcessedPrompt
from epd.sampling_params import SamplingParams

UNITS = UnitCosts(patch_s=1e-4, prefill_token_s=1e-3, decode_token_s=1e-2)
CONFIG = AutoRolesConfig(dwell_s=10.0, interval_s=1.0, min_requests=1, trigger_s=0.5, enter_ratio=2.0)
RECENT = (RecentRequest(0.0, ProcessedPrompt([1, 2, 3], [], [], None), SamplingParams(max_tokens=4)),)


def policy(config: AutoRolesConfig = CONFIG) -> AutoRoles:
    return AutoRoles(config, DrainScorer(UNITS), UNITS)


def view(
    now: float,
    roles: dict[str, str],
    work: dict[str, dict[str, int]],
    *,
    switching: str | None = None,
    last_switched: dict[str, float] | None = None,
    dead: tuple[str, ...] = (),
    switchable: bool = False,
) -> ClusterView:
    last_switched = last_switched or {}
    instances = tuple(
        InstanceView(
            name,
            letters,
            alive=name not in dead,
            has_language=letters != "E",
            has_vision="E" in letters,
            switchable=switchable,
            work=work.get(name, {}),
            last_switched=last_switched.get(name),
        )
        for name, letters in roles.items()
    )
    return ClusterView(now, instances, switching, RECENT)


EPPD = {"E0": "E", "P0": "P", "P1": "P", "D0": "D"}
EPDD = {"E0": "E", "P0": "P", "D0": "D", "D1": "D"}


def test_growing_decode_queues_move_a_prefill_instance_to_decode():
    p = policy()
    calm = view(0.0, EPPD, {"P0": {"P": 100}, "D0": {"D": 20}})
    assert p.observe(calm) is None, "0.2 s to drain: below the trigger"
    busy = view(1.0, EPPD, {"P0": {"P": 100}, "D0": {"D": 400}})  # 4 s of decode on one D

    decision = p.observe(busy)

    assert decision is not None and (decision.instance, decision.roles) == ("P1", "D")
    assert decision.stage == "decode", "the reason the metrics label it with"
    assert p.evaluations == 1


def test_growing_prefill_queues_move_a_decode_instance_to_prefill():
    p = policy()
    decision = p.observe(view(0.0, EPDD, {"P0": {"P": 6000}, "D0": {"D": 30}}))  # 6 s of prefill

    assert decision is not None and (decision.instance, decision.roles) == ("D1", "P")
    assert decision.stage == "prefill"


def test_a_steady_load_near_the_boundary_never_switches():
    """2 s of decode on one D against 1 s of prefill on two P's: moving a P halves one and doubles
    the other, the same total; the imbalance crosses enter_ratio now and then, the margin holds."""
    p = policy()
    decisions = []
    for second in range(300):
        wobble = (second % 7) - 3  # +-3%: the trigger fires on some looks, not on others
        work = {"P0": {"P": 1000}, "P1": {"P": 1000}, "D0": {"D": 200 + 2 * wobble}}
        decisions.append(p.observe(view(float(second), EPPD, work)))
    assert decisions == [None] * 300
    assert p.evaluations > 0, "the boundary was looked at, and refused by the margin"


def test_no_instance_moves_again_within_its_dwell_time():
    """Decode-heavy, then at once prefill-heavy: the instance just moved stays put for dwell_s; the
    other stays a candidate, so the move back is by whichever instance has dwelt."""
    p = policy()
    roles = dict(EPPD)
    first = p.observe(view(0.0, roles, {"P0": {"P": 50}, "D0": {"D": 500}}))
    assert first is not None and (first.instance, first.roles) == ("P1", "D")
    roles["P1"] = "D"
    switched = {"P1": 0.5}  # its switch ended half a second later
    prefill_heavy = {"P0": {"P": 8000}, "D0": {"D": 30}}
    later = []
    for tenth in range(6, 200):
        now = tenth / 10
        decision = p.observe(view(now, roles, prefill_heavy, last_switched=switched))
        if decision is not None:
            later.append((now, decision.instance, decision.roles))
            break
    # D0 had never switched: it may go to P at once; P1 may not.
    assert later and later[0][1] == "D0" and later[0][2] == "P"
    assert all(name != "P1" or now - 0.5 >= CONFIG.dwell_s for now, name, _ in later)


def test_only_the_instance_that_dwelt_long_enough_is_a_candidate():
    p = policy()
    roles = {"E0": "E", "P0": "P", "D0": "D", "D1": "D"}
    work = {"P0": {"P": 8000}, "D0": {"D": 20}}
    recently = {"D0": 5.0, "D1": 6.0}
    assert p.observe(view(10.0, roles, work, last_switched=recently)) is None, "both moved < 10 s ago"
    decision = p.observe(view(15.5, roles, work, last_switched=recently))
    assert decision is not None and decision.instance == "D0", "D0 has dwelt 10.5 s, D1 9.5 s"


def test_nothing_is_decided_while_a_switch_is_under_way():
    p = policy()
    heavy = {"P0": {"P": 100}, "D0": {"D": 900}}
    assert p.observe(view(0.0, EPPD, heavy, switching="P0")) is None
    assert p.state is PolicyState.SWITCHING and p.evaluations == 0
    assert p.observe(view(1.0, EPPD, heavy)) is not None, "once it is over, the policy looks again"
    assert p.state is PolicyState.STEADY


def test_no_move_leaves_a_role_without_a_live_instance():
    """1E+1P+1D: every instance is the only one of its role; decode-heavy or not, nothing moves."""
    p = policy()
    roles = {"E0": "E", "P0": "P", "D0": "D"}
    assert p.observe(view(0.0, roles, {"D0": {"D": 5000}})) is None
    assert legal_moves(view(0.0, roles, {})) == []
    # P1 dead: P0 is the last live P, so it may not move to D however long the decode queue.
    assert p.observe(view(5.0, EPPD, {"D0": {"D": 5000}}, dead=("P1",))) is None


@pytest.mark.parametrize(
    "roles",
    [EPPD, EPDD, {"E0": "E", "E1": "E", "PD0": "PD", "D0": "D"}, {"EP0": "EP", "EP1": "EP", "D0": "D"}],
)
@pytest.mark.parametrize("switchable", [False, True])
def test_every_legal_move_keeps_every_role_served(roles: dict[str, str], switchable: bool):
    now = view(0.0, roles, {}, switchable=switchable)
    held = set("".join(roles.values()))
    for move in legal_moves(now):
        after = layout_after(now, move)
        assert held <= set("".join(after)), f"{move} drops a role"
        others = [r for name, r in roles.items() if name != move.instance]
        assert any("P" in r for r in others) and any("D" in r for r in others), (
            f"{move}: none while it drains"
        )
        if not switchable:
            assert "E" not in move.before + move.after, "E moves only with --switchable-roles"


def test_encoders_move_only_when_switchable():
    roles = {"E0": "E", "E1": "E", "P0": "P", "D0": "D"}
    work = {"E0": {"E": 10}, "P0": {"P": 100}, "D0": {"D": 900}}
    assert policy().observe(view(0.0, roles, work)) is None, "decode-bound, but only E could move"
    decision = policy().observe(view(0.0, roles, work, switchable=True))
    assert decision is not None and decision.instance in ("E0", "E1") and "D" in decision.roles


def test_stage_loads_read_the_work_as_drain_seconds():
    loads = stage_loads(view(0.0, EPPD, {"P0": {"P": 2000}, "D0": {"D": 300}}), UNITS)
    assert loads["P"].drain_s == pytest.approx(1.0), "2000 tokens x 1 ms on two P's"
    assert loads["D"].drain_s == pytest.approx(3.0), "300 tokens x 10 ms on one D"
    assert loads["E"].drain_s == 0.0 and loads["E"].instances == 1


def test_bad_knobs_are_refused_with_their_name():
    with pytest.raises(ValueError, match="dwell_s"):
        AutoRolesConfig(dwell_s=-1)
    with pytest.raises(ValueError, match="enter_ratio"):
        AutoRolesConfig(enter_ratio=0.5)
