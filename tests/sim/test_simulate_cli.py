"""`epd simulate`: bench's flags, bench's results format (marked simulated), the same results for
the same seed, and `epd bench plot` overlaying simulated runs."""

from __future__ import annotations

import argparse
from pathlib import Path

import pytest

from epd.bench.serve.results import FORMAT, load
from epd.cli import build_parser, main


def option_strings(command: str, groups: tuple[str, ...]) -> set[str]:
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    parser = sub.choices[command]
    return {
        flag
        for group in parser._action_groups
        if group.title in groups
        for action in group._group_actions
        for flag in action.option_strings
    }


def test_takes_exactly_the_workload_and_arrival_flags_of_bench():
    groups = ("workload", "arrivals")
    assert option_strings("simulate", groups) == option_strings("bench", groups)
    slo = option_strings("simulate", ("SLOs and output",))
    assert {"--slo-ttft", "--slo-tpot", "--out", "--label"} <= slo
    engine = option_strings("simulate", ("model and engine",))
    assert {"--max-num-seqs", "--max-num-batched-tokens", "--block-size", "--kv-cache-memory-bytes"} <= engine
    assert {"--num-kv-blocks", "--mm-cache-bytes", "--layout", "--model"} <= engine


def test_help_needs_no_torch():
    import subprocess
    import sys

    code = "import sys; from epd.cli import main; main(['simulate', '--help'])\n"
    code += "assert 'torch' not in sys.modules, 'simulate --help imported torch'"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "--profile" in done.stdout and "--image-reuse" in done.stdout


def test_writes_bench_results_marked_simulated(simulate, quick, tmp_path: Path):
    doc = simulate("--layout", "1E+1P+1D", "--rates", "4,8", "--slo-ttft", "1", "--slo-tpot", "0.05", *quick)
    assert doc["format"] == FORMAT and doc["simulated"] is True
    assert doc["label"] == "sim 1E+1P+1D" and doc["config"]["workload"]["images_per_request"] == [1, 1]
    sim = doc["simulation"]
    assert sim["layout"] == "1E+1P+1D" and sim["profile"] is None and sim["costs"]["type"] == "LinearCosts"
    assert [r["leftovers"] for r in sim["runs"]] == [[], []]
    assert [run["rate"] for run in doc["runs"]] == [4, 8]
    for run in doc["runs"]:
        s = run["summary"]
        assert s["completed"] == 40 and s["failed"] == 0 and s["total_output_tokens"] == 40 * 8
        assert 0 < s["ttft"]["p50"] <= s["e2e"]["p50"] and s["tpot"]["p50"] > 0 and s["slo_attainment"] == 1
        assert set(run["stages"]) >= {"encode", "mm_transfer", "prefill", "kv_transfer", "decode"}
        first = run["requests"][0]
        assert first["ok"] and first["num_images"] == 1 and len(first["itl"]) == 7 and first["epd_timings"]
        for r in run["requests"]:  # the first token, then the gaps, add up to the whole request
            assert r["ttft"] + sum(r["itl"]) == pytest.approx(r["e2e"])
            assert r["tpot"] == pytest.approx(sum(r["itl"]) / 7)
    assert doc["sweep"]["goodput_rate"] == 8
    written = {p.name for p in (tmp_path / "sim").iterdir()}
    assert {
        "results.json",
        "ttft_cdf.png",
        "attainment.png",
        "stage_breakdown.png",
        "overview.png",
    } <= written


def without_wall_times(doc: dict) -> dict:
    sim = doc["simulation"]
    runs = [{k: v for k, v in run.items() if "wall" not in k} for run in sim["runs"]]
    return {**doc, "created": None, "git_revision": None, "simulation": {**sim, "runs": runs}}


def test_same_seed_same_results(simulate, quick):
    flags = ["--layout", "2E+1P+1D", "--rate", "20", "--image-reuse", "0.5", "--images-per-request", "0-3"]
    first = simulate(*flags, *quick, name="a")
    second = simulate(*flags, *quick, name="b")
    assert without_wall_times(first) == without_wall_times(second)
    other_seed = simulate(*flags, *quick, "--seed", "8", name="c")  # the last --seed wins
    assert other_seed["simulation"]["runs"][0]["log_digest"] != first["simulation"]["runs"][0]["log_digest"]


def test_bench_plot_overlays_simulated_runs(simulate, quick, tmp_path: Path):
    simulate("--layout", "1E+1P+1D", "--rates", "4,8", "--slo-ttft", "0.5", *quick, name="one")
    simulate("--layout", "4EPD", "--rates", "4,8", "--slo-ttft", "0.5", *quick, name="four")
    out = tmp_path / "plots"
    files = [str(tmp_path / "one" / "results.json"), str(tmp_path / "four")]
    assert main(["bench", "plot", *files, "--out", str(out)]) == 0
    assert {"ttft_cdf.png", "attainment.png", "stage_breakdown.png", "overview.png"} <= {
        p.name for p in out.iterdir()
    }
    assert load(files[0])["simulated"] is True


def test_profile_and_costs_are_exclusive(quick, tmp_path: Path, capsys):
    profile = tmp_path / "profile.json"
    profile.write_text("{}")
    args = ["simulate", "--profile", str(profile), "--costs", "step_s=0.01", *quick, "--out", str(tmp_path)]
    assert main(args) == 1
    assert "--costs" in capsys.readouterr().out


@pytest.mark.parametrize("bad", [["--costs", "nope=1"], ["--costs", "step_s=-1"]])
def test_bad_costs_are_reported(bad: list[str], quick, tmp_path: Path, capsys):
    assert main(["simulate", *bad, *quick, "--out", str(tmp_path)]) == 1
    assert "epd simulate:" in capsys.readouterr().out
