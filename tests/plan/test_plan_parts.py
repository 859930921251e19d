"""The planner's parts on their own: the layouts it enumerates, the capacity bound, the rate search
and the knob order (epd.plan.search)."""

from __future__ import annotations

import math

import pytest

from epd.cluster.layout import Layout
from epd.plan.search.capacity import StageWork, capacity
from epd.plan.search.evaluate import Trial
from epd.plan.search.knobs import Knobs, KnobSpace, proposals
from epd.plan.search.layouts import candidate_layouts, parse_kinds
from epd.plan.search.rates import search_rate


@pytest.mark.parametrize(("gpus", "count"), [(1, 1), (2, 9), (3, 35), (4, 94)])
def test_every_valid_layout_once_in_canonical_text(gpus: int, count: int):
    layouts = candidate_layouts(gpus)
    texts = [layout.text for layout in layouts]
    assert len(texts) == len(set(texts)) == count
    for layout in layouts:
        assert layout.num_instances == gpus and Layout.parse(layout.text) == layout
    assert "1EP+1D" in [layout.text for layout in candidate_layouts(2)]


def test_instance_kinds_restrict_the_layouts():
    kinds = parse_kinds("d, p ,E")
    assert kinds == ("E", "P", "D")
    assert [lay.text for lay in candidate_layouts(4, kinds)] == ["2E+1P+1D", "1E+2P+1D", "1E+1P+2D"]
    assert candidate_layouts(2, kinds) == []
    with pytest.raises(ValueError):
        parse_kinds("E,ED")


def test_capacity_is_limited_by_the_scarcest_roles():
    work = StageWork(encode=0.1, prefill=0.01, decode=0.05)  # seconds per request
    assert capacity(Layout.parse("1E+1P+1D"), work).rate == pytest.approx(10)  # one encoder
    assert capacity(Layout.parse("1E+1P+1D"), work).limiting == "E"
    assert capacity(Layout.parse("2E+1P+1D"), work).rate == pytest.approx(20)  # E and D both
    assert capacity(Layout.parse("2E+1P+1D"), work).limiting == "E"  # a tie: the fewer roles
    assert capacity(Layout.parse("3E+1P+1D"), work).limiting == "D"
    # Aggregated: every instance does everything, the total work is the limit.
    assert capacity(Layout.parse("4EPD"), work).rate == pytest.approx(4 / 0.16)
    assert capacity(Layout.parse("4EPD"), work).limiting == "E+P+D"


def fake_run(limit: float, calls: list[float]):
    """A configuration that meets the SLOs up to `limit` req/s."""

    def run(rate: float) -> Trial:
        calls.append(rate)
        attained = 1.0 if rate <= limit else 0.5
        return Trial(rate, attained, 0.1, 0.01, 0.2, 10, {"E": 0.5, "P": 0.2, "D": 0.1}, 0.5)

    return run


def test_rate_search_brackets_then_bisects_under_the_ceiling():
    calls: list[float] = []
    search = search_rate(fake_run(7.3, calls), ceiling=40.0, probe=None, steps=4)
    assert 7.3 / 1.1 < search.best.rate <= 7.3 and search.best.rate <= search.goodput < 7.3 * 1.1
    assert max(calls) <= 40 and len(calls) == len(search.trials) <= 7 and not search.at_capacity


def test_rate_search_stops_at_one_simulation_below_the_probe_and_at_the_ceiling():
    calls: list[float] = []
    search = search_rate(fake_run(7.3, calls), ceiling=40.0, probe=8.0, steps=4)
    assert calls == [8.0] and search.goodput is None and search.below == 8.0
    capped = search_rate(fake_run(100.0, []), ceiling=40.0, probe=None, steps=4)
    assert capped.at_capacity and 40 / 1.1 < capped.goodput <= 40
    assert all(t.rate <= 40 for t in capped.trials)


def test_rate_search_out_of_budget_reports_nothing():
    search = search_rate(lambda rate: None, ceiling=40.0, probe=None, steps=4)
    assert search.trials == () and search.goodput is None and search.below is None


def test_knob_proposals_try_the_neighbours_first_in_a_seeded_order():
    space = KnobSpace((64, 128, 256), (1024, 2048, 4096))
    layout = Layout.parse("2EPD")
    start = space.start(layout)
    assert start == Knobs(256, 2048)
    first = list(proposals(space, layout, start, {start}, seed=3))
    assert first == list(proposals(space, layout, start, {start}, seed=3))
    neighbours = {Knobs(128, 2048), Knobs(256, 1024), Knobs(256, 4096)}  # 256 tops its grid
    assert len(first) == 3 * 3 - 1 and set(first[:3]) == neighbours
    # Without an instance that prefills and decodes, the token budget is the engine's: not searched.
    disaggregated = Layout.parse("1EP+1D")
    assert space.start(disaggregated) == Knobs(256, None)
    tried = list(proposals(space, disaggregated, Knobs(256), set(), 0))
    assert [k.max_num_batched_tokens for k in tried] == [None] * 3
    assert math.isfinite(capacity(disaggregated, StageWork(0.0, 0.01, 0.0)).rate)
