"""The fitter recovers known cost models from synthetic timings (epd.plan.profile.fit).

Timings are made by a known formula over the terms of realistic shapes, times multiplicative noise
(what a median of repeated timings looks like); the fit must give the formula's coefficients back.
"""

from __future__ import annotations

import numpy as np
import pytest

from epd.plan.profile.features import TERMS, as_runs, terms_of
from epd.plan.profile.fit import StageFit, fit_stage, nonnegative_least_squares
from epd.plan.profile.grids import default_grids

NOISE = 0.01  # 1 % relative noise on every timing (a median of GPU timings: about that)
TRUTH = {
    "prefill": (2e-3, 5e-5, 1e-8, 3e-4),  # step, token, attention_pair, sequence
    "decode": (4e-3, 2e-5, 1e-7),  # step, sequence, context_token
    "encode": (1e-3, 2e-3, 2e-5, 1e-9),  # batch, image, patch, patch_pair
    "transfer": (5e-5, 1e-10),  # latency, 10 GB/s
}
# The terms that carry most of the time: known to 10 % whatever else the fit does.
DOMINANT = {
    "prefill": ("token", "attention_pair"),
    "decode": ("context_token",),
    "encode": ("patch", "patch_pair"),
}


def shapes(stage: str) -> list:
    """The CUDA default grid's shapes, stored as a profile stores them."""
    grids = default_grids("cuda")
    if stage == "prefill":
        return [as_runs(step) for step in grids.prefill_steps(32768)]
    if stage == "decode":
        return [as_runs(step) for step in grids.decode_steps(32768)]
    if stage == "encode":
        return [as_runs(batch) for batch in grids.encode_batches()]
    return [int(2**power) for power in range(12, 30)]  # 4 KB .. 512 MB


def synthetic(
    stage: str, truth: tuple[float, ...], seed: int = 0, floor: float = 0.0
) -> tuple[list, list[float]]:
    rng = np.random.default_rng(seed)
    rows = [terms_of(stage, shape, graph_sizes=()) for shape in shapes(stage)]
    exact = np.maximum(floor, np.asarray(rows) @ np.asarray(truth))
    return rows, list(exact * (1 + rng.normal(0, NOISE, len(exact))))


@pytest.mark.parametrize("stage", list(TRUTH))
def test_known_coefficients_come_back(stage):
    rows, seconds = synthetic(stage, TRUTH[stage])
    fit = fit_stage(TERMS[stage], rows, seconds)
    for term, want, got in zip(fit.terms, TRUTH[stage], fit.coefficients):
        # Terms that carry little of any timing (a fixed cost next to seconds of compute) are
        # known less well than the dominant ones; 30 % still tells a wrong model from a right one.
        assert got == pytest.approx(want, rel=0.3), f"{stage}.{term}"
    assert NOISE / 2 < fit.rms_rel_error < 2 * NOISE
    assert fit.max_rel_error < 5 * NOISE and fit.num_points == len(seconds)


@pytest.mark.parametrize(("stage", "floor"), [("prefill", 15e-3), ("encode", 40e-3)])
def test_a_launch_floor_and_the_work_above_it_come_back(stage, floor):
    # Small steps take as long as launching them (the floor), large ones as long as their work.
    rows, seconds = synthetic(stage, TRUTH[stage], floor=floor)
    floored = sum(np.asarray(rows) @ np.asarray(TRUTH[stage]) < floor)
    assert 3 <= floored <= len(rows) - 3, "the floor must decide some points, not all: no test"

    fit = fit_stage(TERMS[stage], rows, seconds, floor=True)
    assert fit.floor == pytest.approx(floor, rel=0.05)
    # Above the floor, fixed costs are a few percent of any timing: only the work terms that
    # carry the timings there can be known (and are what predictions rest on).
    for term in DOMINANT[stage]:
        want = TRUTH[stage][TERMS[stage].index(term)]
        assert fit.coefficient(term) == pytest.approx(want, rel=0.1), f"{stage}.{term}"
    exact = np.maximum(floor, np.asarray(rows) @ np.asarray(TRUTH[stage]))
    assert max(abs(fit.predict(row) / t - 1) for row, t in zip(rows, exact)) < 3 * NOISE
    assert fit.rms_rel_error < 2 * NOISE
    # The plain sum cannot bend at the floor: it fits the same timings worse.
    assert fit_stage(TERMS[stage], rows, seconds).rms_rel_error > 2 * fit.rms_rel_error


@pytest.mark.parametrize("stage", ["prefill", "decode", "encode"])
def test_a_floor_allowed_where_there_is_none_changes_nothing_that_matters(stage):
    rows, seconds = synthetic(stage, TRUTH[stage])
    fit = fit_stage(TERMS[stage], rows, seconds, floor=True)
    assert fit.floor <= min(seconds) * (1 + 3 * NOISE)  # no point lifted above its noise
    for term in DOMINANT[stage]:
        want = TRUTH[stage][TERMS[stage].index(term)]
        assert fit.coefficient(term) == pytest.approx(want, rel=0.1), f"{stage}.{term}"
    exact = np.asarray(rows) @ np.asarray(TRUTH[stage])
    assert max(abs(fit.predict(row) / t - 1) for row, t in zip(rows, exact)) < 3 * NOISE


def test_transfer_latency_and_bandwidth_to_a_few_percent():
    rows, seconds = synthetic("transfer", TRUTH["transfer"], seed=3)
    fit = fit_stage(TERMS["transfer"], rows, seconds)
    assert fit.coefficient("latency") == pytest.approx(5e-5, rel=0.05)
    assert 1 / fit.coefficient("byte") == pytest.approx(1e10, rel=0.05)


def test_a_term_absent_from_the_data_is_zero_not_negative():
    # Decode timings with no per-sequence cost: unconstrained least squares puts a small negative
    # number there to absorb noise; the fit must not.
    truth = (4e-3, 0.0, 1e-7)
    negatives = 0
    for seed in range(5):
        rows, seconds = synthetic("decode", truth, seed)
        free, *_ = np.linalg.lstsq(np.asarray(rows) / np.asarray(seconds)[:, None], np.ones(len(seconds)))
        negatives += int((free < 0).any())
        fit = fit_stage(TERMS["decode"], rows, seconds)
        assert min(fit.coefficients) >= 0
        # At the largest batch (256), less than a tenth of the 4 ms step: within the noise.
        assert fit.coefficient("sequence") * 256 < 0.1 * 4e-3
        assert fit.coefficient("context_token") == pytest.approx(1e-7, rel=0.1)
    assert negatives > 0, "the data never tempted an unconstrained fit below zero: no test"


def test_nonnegative_least_squares_is_exact_on_a_small_problem():
    a = np.array([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0]])
    b = np.array([2.0, -1.0, 1.0])  # the unconstrained optimum has x1 < 0
    x = nonnegative_least_squares(a, b)
    assert x[1] == 0.0 and x[0] == pytest.approx(1.5)  # argmin (x0 - 2)^2 + (x0 - 1)^2


def test_fit_round_trips_through_json():
    rows, seconds = synthetic("encode", TRUTH["encode"], floor=15e-3)
    fit = fit_stage(TERMS["encode"], rows, seconds, floor=True)
    assert fit.floor > 0
    assert StageFit.from_json(fit.to_json()) == fit


def test_no_or_nonpositive_timings_are_refused():
    with pytest.raises(ValueError):
        fit_stage(TERMS["transfer"], [], [])
    with pytest.raises(ValueError):
        fit_stage(TERMS["transfer"], [[1.0, 10.0]], [0.0])
