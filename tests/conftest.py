"""Shared fixtures: tiny random-weight checkpoints of both families, built once per session."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from epd.testing.checkpoints import build_tiny_checkpoint

FAMILIES = ("qwen2_5_vl", "qwen2_vl")


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {family: build_tiny_checkpoint(root / family, family) for family in FAMILIES}


@pytest.fixture(params=FAMILIES)
def family(request: pytest.FixtureRequest) -> str:
    return request.param


@pytest.fixture
def checkpoint(checkpoints: dict[str, Path], family: str) -> Path:
    return checkpoints[family]


@pytest.fixture(autouse=True)
def _deterministic_threads() -> None:
    # Same thread count for our engine and the reference: float reductions then agree more often.
    torch.set_num_threads(2)
