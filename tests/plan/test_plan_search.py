"""`epd plan` end to end on synthetic profiles whose best layout is known from the physics: the
winner, the same plan for the same seed, the fewest GPUs for a rate, and the `epd serve` command."""

from __future__ import annotations

import argparse
import dataclasses
import json
import shlex
from pathlib import Path

import pytest

from epd.cli import _HelpFormatter, build_parser, engine_args_from
from epd.plan.profile import Profile
from epd.plan.profile.features import TERMS
from epd.plan.profile.fit import StageFit
from epd.plan.profile.store import Measurement, ProfileMeta, StageProfile
from epd.plan.search.cli import add_plan_parser, run_plan

# Coefficients, in the terms of epd.plan.profile.features:
#   prefill (step, token, attention_pair, sequence), decode (step, sequence, context_token),
#   encode (batch, image, patch, patch_pair). A 224 px image is 256 patches and 64 prompt tokens;
#   a request here is ~140 prompt tokens, one image and 16 output tokens.
CHEAP_PREFILL, CHEAP_DECODE, CHEAP_ENCODE = (1e-3, 1e-5, 0, 1e-4), (1e-3, 1e-4, 0), (1e-3, 0, 1e-6, 0)
BOUND_BY = {
    "encode": (CHEAP_PREFILL, CHEAP_DECODE, (1e-3, 0, 2e-4, 0)),  # 51 ms an image
    "prefill": ((1e-3, 3e-4, 0, 1e-4), CHEAP_DECODE, CHEAP_ENCODE),  # 43 ms a prompt
    "decode": (CHEAP_PREFILL, (5e-3, 5e-3, 0), CHEAP_ENCODE),  # 5 ms per sequence per step
}
# A 280 ms prefill next to 10 ms decode steps: one prefill in a request's decode breaks a 20 ms TPOT.
INTERFERING = ((1e-3, 2e-3, 0, 1e-4), (1e-2, 1e-4, 0), (1e-3, 0, 4e-5, 0))
SLOS = ["--slo-ttft", "0.5", "--slo-tpot", "0.1"]
WORKLOAD = ["--num-requests", "40", "--output-tokens", "16", "--image-size", "224x224", "--seed", "5"]


def write_profile(path: Path, prefill: tuple, decode: tuple, encode: tuple) -> Path:
    def stage(name: str, coefficients: tuple, devices: tuple = ()) -> StageProfile:
        return StageProfile(StageFit(TERMS[name], coefficients, 0.0, 0.0, 1), (Measurement(1, 1.0),), devices)

    meta = ProfileMeta("cuda:0", "synthetic", "float32", "demo", "0" * 64, "0", "0", "dummy", "x", ())
    stages = {"prefill": stage("prefill", prefill), "decode": stage("decode", decode)}
    stages["encode"] = stage("encode", encode)
    link = stage("transfer", (1e-5, 1e-11), ("cuda:0", "cuda:1"))  # 10 us + 100 GB/s
    Profile(meta, stages, {"cuda_ipc": link}).save(path)
    return path


def plan(tmp_path: Path, costs: tuple, *flags: str, name: str = "plan") -> dict:
    """Run `epd plan --profile <costs> FLAGS --json <tmp>` and return the JSON."""
    parser = argparse.ArgumentParser(prog="epd")
    add_plan_parser(parser.add_subparsers(dest="command"), _HelpFormatter)
    profile = write_profile(tmp_path / f"{name}-profile.json", *costs)
    out = tmp_path / f"{name}.json"
    args = parser.parse_args(["plan", "--profile", str(profile), *WORKLOAD, *flags, "--json", str(out)])
    assert run_plan(args) == 0
    return json.loads(out.read_text())


@pytest.mark.parametrize(
    ("bound", "best"), [("encode", "2E+1P+1D"), ("prefill", "1E+2P+1D"), ("decode", "1E+1P+2D")]
)
def test_the_busiest_stage_gets_the_extra_gpu(tmp_path: Path, bound: str, best: str):
    flags = ["--gpus", "4", "--instance-kinds", "E,P,D", "--knob-trials", "1", *SLOS]
    doc = plan(tmp_path, BOUND_BY[bound], *flags)
    winner = doc["winner"]
    assert winner["layout"] == best and winner["gpus"] == 4
    assert winner["bottleneck"].startswith(bound[0].upper())
    assert winner["goodput"] > 0 and winner["attainment"] >= 0.9
    assert winner["ttft_p90"] <= 0.5 and winner["tpot_p90"] <= 0.1
    others = [row["goodput"] or 0 for row in doc["ranked"] + doc["unranked"] if row["layout"] != best]
    assert max(others, default=0) < winner["goodput"]


def test_a_tight_tpot_keeps_decode_apart_from_prefill(tmp_path: Path):
    """DistServe's case among all 9 layouts of 2 GPUs: with prefills far longer than the TPOT SLO,
    any instance that both prefills and decodes misses it; 1EP+1D does not. Nor does 1EP+1PD on
    this workload: every request has an image, and images are prefilled where the vision tower is
    (the router, with no encoder-only instance), so its PD instance only ever decodes."""
    flags = ["--gpus", "2", "--slo-ttft", "2", "--slo-tpot", "0.02", "--knob-trials", "0"]
    doc = plan(tmp_path, INTERFERING, *flags)
    apart = {"1EP+1D", "1EP+1PD"}
    assert doc["winner"]["layout"] in apart
    looked_at = {row["layout"] for row in doc["ranked"] + doc["unranked"]}
    assert len(looked_at) == 9
    runner_up = [row for row in doc["ranked"] if row["layout"] not in apart]
    assert runner_up and all(row["goodput"] < 0.85 * doc["winner"]["goodput"] for row in runner_up)


def test_the_same_seed_gives_the_same_plan(tmp_path: Path):
    flags = ["--gpus", "2", "--slo-ttft", "2", "--slo-tpot", "0.02", "--knob-trials", "2", "--tune-top", "2"]
    first = plan(tmp_path, INTERFERING, *flags, name="a")
    second = plan(tmp_path, INTERFERING, *flags, name="b")
    for doc in (first, second):
        del doc["search"]["wall_s"]
        doc["costs"]["profile"]["path"] = doc["costs"]["profile"]["sha256"] = None  # two files
    assert first == second
    rows = first["ranked"] + first["unranked"]
    assert first["search"]["simulations"] == sum(len(row["trials"]) for row in rows)


def test_a_higher_rate_never_needs_fewer_gpus(tmp_path: Path):
    flags = ["--gpus", "5", "--instance-kinds", "E,P,D", "--knob-trials", "1", *SLOS]
    needed = []
    for rate in (4, 20, 30):
        doc = plan(tmp_path, BOUND_BY["decode"], *flags, "--rate", str(rate), name=f"r{rate}")
        assert doc["mode"] == "gpus" and doc["winner"]["goodput"] >= rate
        needed.append((doc["gpus"], doc["winner"]["layout"]))
    # One D serves ~13 req/s of this workload: each more needs another D, nothing else.
    assert needed == [(3, "1E+1P+1D"), (4, "1E+1P+2D"), (5, "1E+1P+3D")]


def test_too_high_a_rate_has_no_plan(tmp_path: Path, capsys):
    parser = argparse.ArgumentParser(prog="epd")
    add_plan_parser(parser.add_subparsers(dest="command"), _HelpFormatter)
    profile = write_profile(tmp_path / "p.json", *BOUND_BY["decode"])
    flags = ["--gpus", "3", "--rate", "50", *SLOS]
    args = parser.parse_args(["plan", "--profile", str(profile), *WORKLOAD, *flags])
    assert run_plan(args) == 2
    assert "no layout of up to 3 GPUs serves 50 req/s" in capsys.readouterr().out


def test_the_serve_command_parses_into_the_planned_engine_args(tmp_path: Path):
    engine = ["--dtype", "bfloat16", "--kv-cache-memory-bytes", "64MiB", "--disable-prefix-caching"]
    doc = plan(tmp_path, INTERFERING, "--gpus", "2", "--slo-tpot", "0.02", "--knob-trials", "1", *engine)
    winner = doc["winner"]
    argv = shlex.split(winner["serve_command"])
    assert argv[:2] == ["epd", "serve"] and argv[2:] == winner["serve_args"]
    args = build_parser().parse_args(argv[1:])
    parsed = engine_args_from(args, args.model)
    fields = {f.name: getattr(parsed, f.name) for f in dataclasses.fields(parsed) if f.name != "limits"}
    assert fields == winner["engine_args"]
    assert parsed.layout == winner["layout"] and parsed.devices == "cuda:0,cuda:1"
    assert parsed.max_num_seqs == winner["knobs"]["max_num_seqs"] and not parsed.enable_prefix_caching


def test_every_option_is_explained_and_help_needs_no_torch():
    import subprocess
    import sys

    code = (
        "import argparse, sys\n"
        "from epd.cli import _HelpFormatter\n"
        "from epd.plan.search.cli import add_plan_parser\n"
        "p = argparse.ArgumentParser(prog='epd')\n"
        "add_plan_parser(p.add_subparsers(), _HelpFormatter)\n"
        "try:\n    p.parse_args(['plan', '--help'])\nexcept SystemExit:\n    pass\n"
        "assert 'torch' not in sys.modules, 'plan --help imported torch'\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    for flag in ("--gpus", "--rate", "--max-simulations", "--num-requests", "--json", "--image-size"):
        assert flag in done.stdout
    parser = argparse.ArgumentParser(prog="epd")
    sub = parser.add_subparsers()
    add_plan_parser(sub, _HelpFormatter)
    actions = [a for a in sub.choices["plan"]._actions if a.option_strings and a.dest != "help"]
    assert actions and all(a.help for a in actions), [a.dest for a in actions if not a.help]
