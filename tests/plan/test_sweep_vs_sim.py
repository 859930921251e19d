"""Validation built in: `epd bench sweep --compare-sim PROFILE` runs each layout for real and on the
simulator with the same requests, and prints measured next to predicted; `epd bench compare`."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from epd.bench.serve.sim_compare import comparison_rows
from epd.cli import main

SERVE = "--max-model-len 1024 --num-kv-blocks 512"
WORKLOAD = ["--image-size", "64x48", "--prompt-tokens", "16", "--output-tokens", "5", "--warmup", "1"]


def summary(ttft_p50: float, tpot_p90: float, throughput: float) -> dict:
    return {
        "request_throughput": throughput,
        "ttft": {"p50": ttft_p50, "p90": None},
        "tpot": {"p50": None, "p90": tpot_p90},
    }


def test_rows_pair_the_rates_both_ran_and_give_relative_errors():
    real = {"label": "2EP+2D", "runs": [{"rate": 2.0, "summary": summary(2.0, 0.010, 1.9)}]}
    real["runs"].append({"rate": 4.0, "summary": summary(1.0, 0.020, 3.0)})
    sim = {"runs": [{"rate": 2.0, "summary": summary(2.3, 0.009, 1.9)}]}
    [row] = comparison_rows(real, sim)  # 4 req/s was not simulated: no row
    assert row["label"] == "2EP+2D" and row["rate"] == 2.0
    assert row["TTFT p50 s"] == (2.0, 2.3, pytest.approx(0.15))
    assert row["TPOT p90 ms"] == (pytest.approx(10.0), pytest.approx(9.0), pytest.approx(-0.1))
    assert row["req/s"] == (1.9, 1.9, 0.0)
    assert row["TTFT p90 s"] == (None, None, None)  # nothing to compare: no error made up


def test_sweep_simulates_each_layout_on_the_same_requests(tiny_profile, tmp_path: Path, capsys):
    args = ["bench", "sweep", "--model", str(tiny_profile.model), "--layouts", "1E+1P+1D"]
    args += ["--serve-args", SERVE, "--compare-sim", str(tiny_profile.path), *WORKLOAD]
    args += ["--rates", "2,4", "--num-requests", "4", "--slo-ttft", "60", "--slo-tpot", "10"]
    assert main([*args, "--out", str(tmp_path), "--no-progress", "--server-start-timeout", "180"]) == 0
    real = json.loads((tmp_path / "1E+1P+1D" / "results.json").read_text())
    sim = json.loads((tmp_path / "1E+1P+1D" / "sim" / "results.json").read_text())
    assert sim["label"] == "sim 1E+1P+1D" and [r["rate"] for r in sim["runs"]] == [2.0, 4.0]
    drawn = [[(r["num_images"], r["prompt_text_tokens"]) for r in run["requests"]] for run in real["runs"]]
    simulated = [[(r["num_images"], r["prompt_text_tokens"]) for r in run["requests"]] for run in sim["runs"]]
    assert drawn == simulated  # same flags, same seed: the same requests
    assert all(run["summary"]["completed"] == 4 for run in sim["runs"])
    printed = capsys.readouterr().out
    assert "measured | simulated" in printed
    assert main(["bench", "compare", str(tmp_path / "1E+1P+1D"), str(tmp_path / "1E+1P+1D" / "sim")]) == 0
    assert "1E+1P+1D" in capsys.readouterr().out


def test_compare_says_when_two_files_share_no_rate(tmp_path: Path, capsys):
    from epd.bench.serve.results import FORMAT

    for name, rate in (("a", 1.0), ("b", 2.0)):
        doc = {"format": FORMAT, "label": name, "runs": [{"rate": rate, "summary": summary(1, 0.01, 1)}]}
        doc["sweep"] = {"rates": [rate]}
        (tmp_path / f"{name}.json").write_text(json.dumps(doc))
    assert main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 1
    assert "share no rate" in capsys.readouterr().out
