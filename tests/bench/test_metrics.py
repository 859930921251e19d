"""Percentiles, SLO attainment, goodput interpolation and summaries against hand-computed numbers."""

from __future__ import annotations

import math

import pytest

from epd.bench.serve.client import RequestResult
from epd.bench.serve.metrics import (
    UNACCOUNTED,
    attainment,
    distribution,
    goodput_rate,
    meets_slo,
    stage_means,
    summarize,
)
from epd.bench.serve.spec import SLO


def result(ttft: float, e2e: float, tokens: int, ok: bool = True, **kw) -> RequestResult:
    return RequestResult(0, 0.0, 0.0, ok=ok, ttft=ttft, e2e=e2e, output_tokens=tokens, **kw)


def test_distribution_matches_linear_interpolation_by_hand():
    # Sorted 1, 2, 3, 4: the p-th percentile sits at rank p/100 * (n - 1) = 3p/100.
    d = distribution([4.0, 1.0, 3.0, 2.0])
    assert d == pytest.approx({"mean": 2.5, "p50": 2.5, "p90": 3.7, "p99": 3.97})
    assert distribution([5.0]) == pytest.approx({"mean": 5.0, "p50": 5.0, "p90": 5.0, "p99": 5.0})
    assert distribution([]) == {"mean": None, "p50": None, "p90": None, "p99": None}


def test_tpot_excludes_the_first_token():
    r = result(ttft=0.5, e2e=1.5, tokens=11)
    assert r.tpot == pytest.approx(0.1)  # (1.5 - 0.5) / (11 - 1)
    assert result(0.5, 0.5, 1).tpot is None


def test_attainment_counts_failures_as_misses():
    rs = [
        result(0.1, 1.1, 11),  # tpot 0.1: meets both
        result(0.3, 1.3, 11),  # ttft 0.3 misses
        result(0.1, 3.1, 11),  # tpot 0.3 misses
        result(0.1, 0.1, 1),  # no tpot: only ttft counts
        result(0.0, 0.0, 0, ok=False),
    ]
    slo = SLO(ttft=0.2, tpot=0.15)
    assert [meets_slo(r, slo) for r in rs] == [True, False, False, True, False]
    assert attainment(rs, slo) == pytest.approx(2 / 5)
    assert attainment(rs, SLO(ttft=0.2)) == pytest.approx(3 / 5)
    assert attainment(rs, SLO()) is None


@pytest.mark.parametrize(
    "rates, attained, expected",
    [
        ([1, 2, 3, 4], [1.0, 0.95, 0.8, 0.5], 2 + (0.95 - 0.9) / (0.95 - 0.8)),  # 2.333...
        ([4, 1, 3, 2], [0.5, 1.0, 0.8, 0.95], 2 + (0.95 - 0.9) / (0.95 - 0.8)),  # order does not matter
        ([1, 2, 4], [1.0, 0.9, 0.0], 2.0),  # exactly at the target
        ([1, 2, 4], [0.95, 0.92, 0.7], 2 + (0.92 - 0.9) / (0.92 - 0.7) * 2),  # 2.1818...
        ([1, 2, 3, 4], [1.0, 0.5, 0.95, 0.2], 3 + (0.95 - 0.9) / (0.95 - 0.2)),  # highest passing rate
        ([1, 2], [1.0, 0.99], 2.0),  # all pass: the highest rate (a lower bound)
        ([1, 2], [0.5, 0.1], 0.0),  # none pass
        ([1, math.inf], [0.5, 1.0], 0.0),  # closed-loop runs have no rate to read
    ],
)
def test_goodput_interpolation(rates, attained, expected):
    assert goodput_rate(rates, attained) == pytest.approx(expected)


def test_goodput_without_slo_or_rates():
    assert goodput_rate([1, 2], [None, None]) is None
    assert goodput_rate([math.inf], [1.0]) is None


def test_summary_throughput_and_accuracy():
    rs = [
        result(0.1, 1.1, 11, prompt_tokens=100, itl=[0.1] * 10, expected="a", correct=True),
        result(0.2, 2.2, 21, prompt_tokens=50, itl=[0.1] * 20, expected="b", correct=False),
        result(0.0, 0.0, 0, ok=False, expected="c"),
    ]
    s = summarize(rs, duration=4.0, slo=SLO(ttft=0.15))
    assert (s["completed"], s["failed"]) == (2, 1)
    assert s["request_throughput"] == pytest.approx(0.5)
    assert s["output_throughput"] == pytest.approx(32 / 4)
    assert s["total_token_throughput"] == pytest.approx((32 + 150) / 4)
    assert s["ttft"]["mean"] == pytest.approx(0.15)
    assert s["tpot"]["p50"] == pytest.approx(0.1)
    assert s["itl"]["p99"] == pytest.approx(0.1)
    assert s["slo_attainment"] == pytest.approx(1 / 3)
    assert s["goodput"] == pytest.approx(1 / 4)
    assert s["accuracy"] == pytest.approx(1 / 3)  # a failed request is a wrong answer


def test_stage_means_count_skipped_stages_as_zero():
    a = result(0.1, 1.0, 5, epd_timings={"preprocess": 0.1, "stages": {"encode": 0.2, "decode": 0.5}})
    b = result(0.1, 0.8, 5, epd_timings={"preprocess": 0.1, "stages": {"decode": 0.6}})
    means = stage_means([a, b, result(0.1, 9.0, 5)])  # the last has no timings: not counted
    # other: client E2E minus the stages, (1.0 - 0.8 + 0.8 - 0.7) / 2
    assert list(means) == ["preprocess", "encode", "decode", UNACCOUNTED]  # lifetime order
    assert means == pytest.approx({"preprocess": 0.1, "encode": 0.1, "decode": 0.55, UNACCOUNTED: 0.15})
    assert stage_means([result(0.1, 1.0, 5)]) is None
