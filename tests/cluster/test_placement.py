"""Placement policies: the real policies on instance specs and a real ledger, no processes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from epd.cluster.layout import Layout, Role
from epd.cluster.router.ledger import LoadLedger, Work
from epd.cluster.router.placement import (
    EncodeAffinity,
    ImageToEncode,
    KeepOnPrefill,
    LeastLoaded,
    Placement,
    SpreadImages,
)


def specs(layout: str) -> dict:
    return {s.name: s for s in Layout.parse(layout).instances("cpu")}


def images(*patches: int) -> list[ImageToEncode]:
    return [ImageToEncode(i, f"img{i}", n) for i, n in enumerate(patches)]


def loaded(**loads: int) -> LoadLedger:
    ledger = LoadLedger()
    for instance, amount in loads.items():
        ledger.reserve(Work("earlier", Role.ENCODE, len(ledger.outstanding())), instance, amount)
    return ledger


# ---- prefill and decode ------------------------------------------------------------------------


def test_prefill_goes_to_the_least_loaded_p() -> None:
    s = specs("1E+2P+1D")
    ledger = LoadLedger()
    ledger.reserve(Work("a", Role.PREFILL), "P0", 500)
    ledger.reserve(Work("b", Role.PREFILL), "P1", 100)
    assert LeastLoaded(Role.PREFILL).choose(list(s.values()), ledger, {}).name == "P1"


def test_ties_go_to_the_first_candidate() -> None:
    s = specs("1E+3P+1D")
    assert LeastLoaded(Role.PREFILL).choose(list(s.values()), LoadLedger(), {}).name == "P0"


def test_a_p_that_also_decodes_keeps_its_request() -> None:
    s = specs("1E+2PD")
    ledger = LoadLedger()
    ledger.reserve(Work("a", Role.DECODE), "PD0", 1)  # PD1 decodes less, but PD0 prefills this one
    chosen = {Role.PREFILL: s["PD0"]}
    assert KeepOnPrefill().choose(list(s.values()), ledger, chosen) is s["PD0"]


def test_decode_goes_to_the_least_loaded_d_when_p_does_not_decode() -> None:
    s = specs("1E+1P+2D")
    ledger = LoadLedger()
    ledger.reserve(Work("a", Role.DECODE), "D0", 1)
    assert KeepOnPrefill().choose(list(s.values()), ledger, {Role.PREFILL: s["P0"]}).name == "D1"


@pytest.mark.parametrize(("policy", "role"), [(LeastLoaded(Role.PREFILL), "P"), (KeepOnPrefill(), "D")])
def test_no_live_candidate_raises_the_routers_error(policy, role) -> None:
    only_encoders = list(specs("2E+1P+1D").values())[:2]
    with pytest.raises(RuntimeError, match=f"^no live instance can take role {role}$"):
        policy.choose(only_encoders, LoadLedger(), {})


def test_default_placement_is_the_routers() -> None:
    placement = Placement()
    assert isinstance(placement.prefill, LeastLoaded) and placement.prefill.role is Role.PREFILL
    assert isinstance(placement.decode, KeepOnPrefill)
    assert isinstance(placement.encode, SpreadImages)


# ---- encoders (IRP) ----------------------------------------------------------------------------


def encoders(n: int) -> list:
    return [s for s in specs(f"{n}E+1P+1D").values() if s.has(Role.ENCODE)]


def test_equal_images_spread_evenly_over_idle_encoders() -> None:
    got = SpreadImages().assign(images(64, 64, 64, 64), encoders(2), LoadLedger(), EncodeAffinity())
    assert sorted(got.values()) == ["E0", "E0", "E1", "E1"]


def test_largest_first_onto_the_least_queued_encoder() -> None:
    got = SpreadImages().assign(images(10, 100, 40, 50), encoders(2), LoadLedger(), EncodeAffinity())
    assert list(got) == [1, 3, 2, 0]  # queued in decreasing size
    assert got == {1: "E0", 3: "E1", 2: "E1", 0: "E1"}  # 100 | 50, +40 (90 < 100), +10 (90 < 100)


def test_patches_already_queued_count() -> None:
    got = SpreadImages().assign(images(30, 30), encoders(2), loaded(E0=100), EncodeAffinity())
    assert got == {0: "E1", 1: "E1"}  # E1 still has fewer queued after the first (30 < 100)


def test_an_image_in_flight_goes_to_the_encoder_encoding_it() -> None:
    affinity = EncodeAffinity()
    affinity.started("img0", "E1")
    got = SpreadImages().assign(images(64), encoders(2), loaded(E1=1000), affinity)
    assert got == {0: "E1"}  # one encoding, even on the busier encoder


def test_an_image_encoded_before_goes_back_there() -> None:
    affinity = EncodeAffinity()
    affinity.started("img0", "E2")
    affinity.finished("img0", "E2")
    assert affinity.inflight == {}
    got = SpreadImages().assign(images(64), encoders(3), loaded(E2=50), affinity)
    assert got == {0: "E2"}


def test_in_flight_wins_over_encoded_before() -> None:
    affinity = EncodeAffinity(inflight={"img0": "E0"}, encoded_at={"img0": "E1"})
    assert SpreadImages().assign(images(8), encoders(2), LoadLedger(), affinity) == {0: "E0"}


def test_a_dead_encoder_is_not_chosen() -> None:
    affinity = EncodeAffinity()
    affinity.started("img0", "E0")  # in flight on E0 when it died
    affinity.started("img1", "E1")
    affinity.finished("img1", "E1")  # encoded on E1, which died later
    affinity.encoder_died("E0")
    affinity.encoder_died("E1")
    assert affinity.inflight == {}
    only_e2 = [e for e in encoders(3) if e.name == "E2"]
    got = SpreadImages().assign(images(5, 5, 5), only_e2, LoadLedger(), affinity)
    assert got == {0: "E2", 1: "E2", 2: "E2"}


def test_an_image_whose_encoder_died_is_spread_like_a_new_one() -> None:
    affinity = EncodeAffinity(encoded_at={"img0": "E0"})
    alive = [e for e in encoders(3) if e.name != "E0"]
    got = SpreadImages().assign(images(5), alive, loaded(E1=9), affinity)
    assert got == {0: "E2"}


def test_a_repeated_image_goes_where_its_first_copy_went() -> None:
    same = [ImageToEncode(0, "h", 64), ImageToEncode(1, "h", 64), ImageToEncode(2, "other", 64)]
    got = SpreadImages().assign(same, encoders(2), LoadLedger(), EncodeAffinity())
    assert got[0] == got[1] != got[2]


def test_no_live_encoder_raises() -> None:
    with pytest.raises(RuntimeError, match="^no live instance can take role E$"):
        SpreadImages().assign(images(4), [], LoadLedger(), EncodeAffinity())


def test_assign_changes_neither_ledger_nor_affinity() -> None:
    ledger, affinity = loaded(E0=7), EncodeAffinity(encoded_at={"img0": "E1"})
    SpreadImages().assign(images(3, 4), encoders(2), ledger, affinity)
    assert ledger.outstanding() == {Work("earlier", Role.ENCODE, 0): ("E0", 7)}
    assert affinity == EncodeAffinity(encoded_at={"img0": "E1"})


@settings(deadline=None)
@given(st.lists(st.integers(1, 200), min_size=1, max_size=12), st.integers(1, 4))
def test_spread_is_balanced_and_largest_first(patches: list[int], n: int) -> None:
    got = SpreadImages().assign(images(*patches), encoders(n), LoadLedger(), EncodeAffinity())
    assert sorted(got) == list(range(len(patches)))
    order = [patches[i] for i in got]
    assert order == sorted(order, reverse=True)
    per_encoder = {e.name: 0 for e in encoders(n)}
    for index, encoder in got.items():
        per_encoder[encoder] += patches[index]
    # Greedy largest-first: no encoder ends more than the largest image above the least loaded one.
    assert max(per_encoder.values()) - min(per_encoder.values()) <= max(patches)
