"""Least squares with non-negative coefficients, on relative error: one small model per stage.

    cost = max(floor, sum(coefficient * term))

Why relative: a stage's measurements span orders of magnitude (a 16-token prefill and a 16k-token
one); plain least squares would fit the largest and leave the small ones, where most steps of a
serving run are, off by multiples. Each row is divided by its measured time, so the fit minimises
sum(((predicted - measured) / measured) ** 2).

Why non-negative: every term is work that can only cost time; a negative coefficient would fit
noise and predict negative or shrinking costs outside the measured grid.

Why a floor: on a GPU, an eager step's host work (launching hundreds of kernels from Python)
overlaps the device's work on them, so a small step takes as long as the launching, whatever its
size, and a large one as long as the device needs: a maximum, not a sum. Where host and device
work add up (a CPU) the best floor is 0 and the model is the plain sum; the data decides.

The solver tries every subset of terms as the free ones (a stage has at most five terms: 31 small
least-squares problems) and keeps the best whose coefficients are all >= 0. That is exact: the
non-negative optimum is the unconstrained optimum on its own support. Floors are tried among the
smaller measured times, the linear part fitted to the points above each.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class StageFit:
    """cost = max(floor, sum(coefficients[term] * term value)); the fit's relative errors on its
    own points."""

    terms: tuple[str, ...]
    coefficients: tuple[float, ...]
    rms_rel_error: float
    max_rel_error: float
    num_points: int
    floor: float = 0.0  # seconds no call takes less than

    def predict(self, values: Sequence[float]) -> float:
        return max(self.floor, float(sum(c * v for c, v in zip(self.coefficients, values))))

    def coefficient(self, term: str) -> float:
        return self.coefficients[self.terms.index(term)]

    def to_json(self) -> dict:
        return {
            "terms": list(self.terms),
            "coefficients": dict(zip(self.terms, self.coefficients)),
            "floor": self.floor,
            "rms_rel_error": self.rms_rel_error,
            "max_rel_error": self.max_rel_error,
            "num_points": self.num_points,
        }

    @classmethod
    def from_json(cls, data: dict) -> StageFit:
        terms = tuple(data["terms"])
        return cls(
            terms,
            tuple(float(data["coefficients"][t]) for t in terms),
            float(data["rms_rel_error"]),
            float(data["max_rel_error"]),
            int(data["num_points"]),
            float(data.get("floor", 0.0)),
        )


def fit_stage(
    terms: Sequence[str], rows: Sequence[Sequence[float]], seconds: Sequence[float], floor: bool = False
) -> StageFit:
    """Fit seconds ~ max(floor, rows @ coefficients), coefficients >= 0, minimising relative error;
    without `floor`, the floor is 0."""
    x = np.asarray(rows, dtype=np.float64).reshape(len(seconds), len(terms))
    y = np.asarray(seconds, dtype=np.float64)
    if len(y) == 0 or (y <= 0).any():
        raise ValueError("a fit needs at least one measurement, every one of positive duration")
    best_floor, coefficients = 0.0, _linear(x, y)
    if floor:
        best_floor, coefficients = _with_floor(x, y, coefficients)
    relative = np.maximum(best_floor, x @ coefficients) / y - 1.0
    return StageFit(
        tuple(terms),
        tuple(float(c) for c in coefficients),
        float(math.sqrt(np.mean(relative**2))),
        float(np.max(np.abs(relative))),
        len(y),
        float(best_floor),
    )


def _linear(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    return nonnegative_least_squares(x / y[:, None], np.ones_like(y))


def _with_floor(x: np.ndarray, y: np.ndarray, no_floor: np.ndarray) -> tuple[float, np.ndarray]:
    """The best (floor, coefficients): each candidate floor among the lower half of the timings,
    the linear part fitted to the points above it, the floor then moved to where it fits the
    points it decides best."""
    best = (_loss(x, y, 0.0, no_floor), 0.0, no_floor)
    for candidate in np.unique(y)[: len(y) // 2 + 1]:
        above = y > candidate
        if above.sum() < x.shape[1]:
            continue
        coefficients = _linear(x[above], y[above])
        floored = x @ coefficients < candidate
        # The floor that fits the points it decides best, in relative error: sum(1/y) / sum(1/y^2).
        floor = float(np.sum(1 / y[floored]) / np.sum(1 / y[floored] ** 2)) if floored.any() else 0.0
        for option in (candidate, floor):
            loss = _loss(x, y, option, coefficients)
            if loss < best[0]:
                best = (loss, option, coefficients)
    return best[1], best[2]


def _loss(x: np.ndarray, y: np.ndarray, floor: float, coefficients: np.ndarray) -> float:
    return float(np.sum((np.maximum(floor, x @ coefficients) / y - 1.0) ** 2))


def nonnegative_least_squares(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """argmin ||a @ x - b|| subject to x >= 0, by trying every support (few columns only)."""
    # Columns can differ by ten orders of magnitude (a constant next to tokens squared):
    # scaled to unit size, the small problems stay well conditioned.
    scale = np.linalg.norm(a, axis=0)
    scale[scale == 0] = 1.0
    scaled = a / scale
    best, best_residual = np.zeros(a.shape[1]), float(np.linalg.norm(b))
    columns = range(a.shape[1])
    for size in range(1, a.shape[1] + 1):
        for support in itertools.combinations(columns, size):
            sub = scaled[:, support]
            solution, *_ = np.linalg.lstsq(sub, b, rcond=None)
            if (solution < 0).any():
                continue
            residual = float(np.linalg.norm(sub @ solution - b))
            if residual < best_residual - 1e-15:
                best, best_residual = np.zeros(a.shape[1]), residual
                best[list(support)] = solution
    return best / scale
