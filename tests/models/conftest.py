"""A tiny random-weight Qwen3-VL checkpoint, built once per session for the tests that need it."""

from __future__ import annotations

from pathlib import Path

import pytest

from epd.testing.checkpoints import build_tiny_checkpoint


@pytest.fixture(scope="session")
def qwen3_checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return build_tiny_checkpoint(tmp_path_factory.mktemp("checkpoints") / "qwen3_vl", "qwen3_vl")
