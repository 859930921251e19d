"""One real quick profile of the tiny checkpoint on the CPU, made through the command line and
shared by the tests/plan session (epd.plan.profile: measure -> fit -> save)."""

from __future__ import annotations

import contextlib
import io
from dataclasses import dataclass
from pathlib import Path

import pytest

from epd.plan.profile.__main__ import main

# Few, small shapes: the whole profile takes seconds on a busy 2-core machine.
TINY_GRIDS = [
    "--decode-batches", "1,4,16", "--decode-contexts", "32,256",
    "--prefill-seqs", "1,2", "--prefill-tokens", "8,64,256", "--prefill-contexts", "0,128",
    "--mixed-decodes", "4", "--encode-images", "1,3", "--encode-sides", "56,112,224",
    "--transfer-mb", "0.01,0.5", "--warmup", "1", "--repeats", "3",
]  # fmt: skip


@dataclass(frozen=True)
class ProfileRun:
    model: Path
    path: Path
    printed: str


@pytest.fixture(scope="session")
def tiny_profile(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> ProfileRun:
    model = checkpoints["qwen2_5_vl"]
    path = tmp_path_factory.mktemp("profile") / "profile.json"
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main(["--model", str(model), "--device", "cpu", "--out", str(path), *TINY_GRIDS])
    assert code == 0, printed.getvalue()
    return ProfileRun(model, path, printed.getvalue())
