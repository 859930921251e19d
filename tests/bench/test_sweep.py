"""`epd bench sweep`: two layouts end to end on the CPU, each server started and stopped in turn."""

from __future__ import annotations

import json
import os
from pathlib import Path

from epd.cli import main

SERVE = "--max-model-len 1024 --num-kv-blocks 512"
WORKLOAD = ["--image-size", "64x48", "--prompt-tokens", "16", "--output-tokens", "5", "--warmup", "1"]
LAYOUTS = ("1EPD", "1E+1P+1D")


def children() -> set[int]:
    """Live (not zombie) child processes of this test process."""
    found = set()
    for entry in filter(str.isdigit, os.listdir("/proc")):
        try:
            stat = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(stat[1]) == os.getpid() and stat[0] != "Z":
            found.add(int(entry))
    return found


def test_sweep_runs_two_layouts_and_compares_them(model: str, tmp_path: Path):
    before = children()
    args = ["bench", "sweep", "--model", model, "--layouts", ",".join(LAYOUTS), "--serve-args", SERVE]
    args += [*WORKLOAD, "--rates", "2,4", "--num-requests", "4", "--slo-ttft", "60", "--slo-tpot", "10"]
    assert main([*args, "--out", str(tmp_path), "--no-progress", "--server-start-timeout", "180"]) == 0
    assert children() <= before, "a layout's server was left running"
    requests = []
    for layout in LAYOUTS:
        doc = json.loads((tmp_path / layout / "results.json").read_text())
        assert doc["label"] == layout and [run["rate"] for run in doc["runs"]] == [2.0, 4.0]
        assert doc["server"]["model"] == model  # served under its path: no --served-model-name
        assert all(run["summary"]["completed"] == 4 for run in doc["runs"])
        assert "ready: OpenAI API" in (tmp_path / layout / "server.log").read_text()
        requests.append([r["num_images"] for run in doc["runs"] for r in run["requests"]])
    assert requests[0] == requests[1]  # the same workload against every layout
    stages = json.loads((tmp_path / "1E+1P+1D" / "results.json").read_text())["runs"][0]["stages"]
    assert {"mm_transfer", "kv_transfer"} <= set(stages)  # only a disaggregated layout moves data
    for name in ("attainment.png", "ttft_cdf.png", "stage_breakdown.png", "overview.png"):
        assert (tmp_path / name).stat().st_size > 1000
