"""epd.bench.memory: its capacity search, and its dry run (a tiny model on the CPU) end to end."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from epd.bench import roofline_setup as rs
from epd.bench.memory import largest_fitting


@pytest.mark.parametrize("threshold", [0, 1, 2, 3, 7, 8, 9, 100, 511, 512, 600])
def test_largest_fitting_finds_the_threshold_in_few_tries(threshold):
    tried = []

    def fits(n: int) -> bool:
        tried.append(n)
        return n <= threshold

    assert largest_fitting(fits, cap=512) == min(threshold, 512)
    assert len(tried) <= 2 * 10 + 1  # doubling up to 512, then bisecting a bracket as wide
    assert max(tried) <= 512  # never past the cap


@pytest.mark.skipif(not rs.SHARED_CONFIGS.exists(), reason=f"needs the model configs in {rs.SHARED_CONFIGS}")
def test_dry_run_writes_every_section(tmp_path):
    result = subprocess.run(
        [sys.executable, "-m", "epd.bench.memory", "--dry-run", "--out", str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "memory.json").read_text())
    assert {"peak", "encode_capacity", "kv_capacity", "meta"} <= report.keys()
    assert set(report["peak"]) == {"E 1x112px", "E 2x112px", "EPD 1x112px", "EPD 2x112px"}
    assert report["peak"]["E 1x112px"]["kv_gib"] == 0 and report["peak"]["EPD 1x112px"]["kv_gib"] > 0
    kv = report["kv_capacity"]
    # Without the vision weights the same budget holds more KV blocks.
    assert kv["PD"]["blocks"] > kv["EPD"]["blocks"] > 0
    assert kv["PD"]["tokens"] == 16 * kv["PD"]["blocks"]
    assert report["encode_capacity"]["E"]["max_images"] >= 1
    assert "| kv_capacity | PD |" in result.stdout
