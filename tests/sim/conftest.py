"""`epd simulate` through the CLI, as a user runs it: the demo model's config, tokenizer and processor."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest

from epd.cli import main

Simulate = Callable[..., dict]


@pytest.fixture
def quick() -> list[str]:
    """Flags of a small, fast workload: a few dozen requests with short answers."""
    return ["--num-requests", "40", "--output-tokens", "8", "--image-size", "224x224", "--seed", "7"]


@pytest.fixture
def simulate(tmp_path: Path) -> Simulate:
    """Run `epd simulate FLAGS --out <tmp>/<name>` and return its results.json."""

    def run(*flags: str, name: str = "sim") -> dict:
        out = tmp_path / name
        assert main(["simulate", *flags, "--out", str(out)]) == 0
        return json.loads((out / "results.json").read_text())

    return run
