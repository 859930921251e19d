"""LoadLedger: loads are the sum of live reservations, whatever order work is reserved and released in."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from epd.cluster.layout import Role
from epd.cluster.router.ledger import LoadLedger, Work

INSTANCES = ["E0", "E1", "P0", "D0", "PD0"]
works = st.builds(
    Work,
    request_id=st.sampled_from(["r0", "r1", "r2", "r3"]),
    stage=st.sampled_from(list(Role)),
    item=st.integers(0, 3),
)


class LedgerMachine(RuleBasedStateMachine):
    """Random interleavings of reserve / release / release_request against a plain dict model."""

    def __init__(self) -> None:
        super().__init__()
        self.ledger = LoadLedger()
        self.model: dict[Work, tuple[str, int]] = {}

    @rule(work=works, instance=st.sampled_from(INSTANCES), amount=st.integers(0, 1000))
    def reserve(self, work: Work, instance: str, amount: int) -> None:
        if work in self.model:
            with pytest.raises(ValueError, match="already reserved"):
                self.ledger.reserve(work, instance, amount)
            return
        self.ledger.reserve(work, instance, amount)
        self.model[work] = (instance, amount)

    @rule(work=works)
    def release(self, work: Work) -> None:
        self.ledger.release(work)  # held or not: never raises
        self.model.pop(work, None)

    @rule(work=works)
    def release_twice(self, work: Work) -> None:
        self.ledger.release(work)
        self.ledger.release(work)
        self.model.pop(work, None)

    @rule(request_id=st.sampled_from(["r0", "r1", "r2", "r3", "never-seen"]))
    def release_request(self, request_id: str) -> None:
        self.ledger.release_request(request_id)
        self.model = {w: r for w, r in self.model.items() if w.request_id != request_id}

    @invariant()
    def reservations_match_the_model(self) -> None:
        assert self.ledger.outstanding() == self.model
        assert self.ledger.is_empty() == (not self.model)

    @invariant()
    def loads_are_sums_of_live_reservations(self) -> None:
        for instance in INSTANCES:
            expected = sum(amount for i, amount in self.model.values() if i == instance)
            assert self.ledger.load(instance) == expected >= 0

    @invariant()
    def instances_of_a_request_are_its_holders(self) -> None:
        for request_id in ("r0", "r1", "r2", "r3"):
            expected = {i for w, (i, _) in self.model.items() if w.request_id == request_id}
            assert self.ledger.instances_of(request_id) == expected

    def teardown(self) -> None:
        # Releasing what is left, request by request, always empties the ledger.
        for request_id in {w.request_id for w in self.model}:
            self.ledger.release_request(request_id)
        assert self.ledger.is_empty()
        assert all(self.ledger.load(i) == 0 for i in INSTANCES)


TestLedgerMachine = LedgerMachine.TestCase
TestLedgerMachine.settings = settings(max_examples=200, stateful_step_count=40, deadline=None)


@settings(deadline=None)
@given(
    st.lists(st.tuples(works, st.sampled_from(INSTANCES), st.integers(0, 50)), unique_by=lambda t: t[0]),
    st.randoms(use_true_random=False),
)
def test_every_reservation_released_in_any_order_leaves_it_empty(reservations, rng) -> None:
    ledger = LoadLedger()
    for work, instance, amount in reservations:
        ledger.reserve(work, instance, amount)
    order = [work for work, _, _ in reservations]
    rng.shuffle(order)
    for work in order:
        ledger.release(work)
        assert all(ledger.load(i) >= 0 for i in INSTANCES)
    assert ledger.is_empty()
    assert ledger.outstanding() == {}
    assert all(ledger.load(i) == 0 for i in INSTANCES)


def test_a_request_lifecycle_releases_what_it_held() -> None:
    ledger = LoadLedger()
    ledger.reserve(Work("r", Role.PREFILL), "P0", 120)
    ledger.reserve(Work("r", Role.DECODE), "D0", 1)
    ledger.reserve(Work("r", Role.ENCODE, 0), "E0", 64)
    ledger.reserve(Work("r", Role.ENCODE, 1), "E1", 16)
    assert [ledger.load(i) for i in ("P0", "D0", "E0", "E1")] == [120, 1, 64, 16]
    assert ledger.holder(Work("r", Role.ENCODE, 1)) == "E1"

    ledger.release(Work("r", Role.ENCODE, 0))  # EncodeDone
    ledger.release(Work("r", Role.PREFILL))  # first token
    assert ledger.instances_of("r") == {"D0", "E1"}

    ledger.release_request("r")  # the request ends: what it still holds goes
    ledger.release_request("r")
    ledger.release(Work("r", Role.ENCODE, 0))  # a late EncodeDone
    assert ledger.is_empty()
    assert ledger.holder(Work("r", Role.ENCODE, 1)) is None
    assert [ledger.load(i) for i in ("P0", "D0", "E0", "E1")] == [0, 0, 0, 0]


def test_release_request_leaves_other_requests_alone() -> None:
    ledger = LoadLedger()
    ledger.reserve(Work("a", Role.DECODE), "D0", 1)
    ledger.reserve(Work("b", Role.DECODE), "D0", 1)
    ledger.release_request("a")
    assert ledger.load("D0") == 1
    assert ledger.outstanding() == {Work("b", Role.DECODE): ("D0", 1)}


def test_reserving_held_work_or_a_negative_amount_raises() -> None:
    ledger = LoadLedger()
    ledger.reserve(Work("r", Role.DECODE), "D0", 1)
    with pytest.raises(ValueError, match="already reserved on D0"):
        ledger.reserve(Work("r", Role.DECODE), "D1", 1)
    with pytest.raises(ValueError, match="negative"):
        ledger.reserve(Work("s", Role.PREFILL), "P0", -5)
    assert ledger.outstanding() == {Work("r", Role.DECODE): ("D0", 1)}
