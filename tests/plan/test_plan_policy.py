"""`epd plan` chooses the queue order too (--scheduling-policy per stage), where requests have a
TTFT SLO: the issue's workload in small, bursty one-image requests with a tight TTFT among 6-image
ones with a loose one, on an encoder-bound profile."""

from __future__ import annotations

import argparse
import json
import shlex
from pathlib import Path

from epd.cli import _HelpFormatter, build_parser, engine_args_from
from epd.engine.queue_policy import StagePolicies
from epd.plan.profile import Profile
from epd.plan.profile.features import TERMS
from epd.plan.profile.fit import StageFit
from epd.plan.profile.store import Measurement, ProfileMeta, StageProfile
from epd.plan.search.cli import add_plan_parser, run_plan
from epd.plan.search.policies import layout_stages, policy_proposals

# Coefficients in the terms of epd.plan.profile.features: cheap prefill and decode, 51 ms an image.
PREFILL, DECODE, ENCODE = (1e-3, 1e-5, 0, 1e-4), (1e-3, 1e-4, 0), (1e-3, 0, 2e-4, 0)


def classes(small_ttft: float | None, large_ttft: float | None) -> str:
    def one(name: str, share: float, images: int, ttft: float | None) -> dict:
        slo = {} if ttft is None else {"slo_ttft": ttft}
        return {"name": name, "share": share, "images_per_request": images, "image_size": "224x224",
                "output_tokens": 16, **slo}  # fmt: skip

    return json.dumps([one("small", 0.7, 1, small_ttft), one("large", 0.3, 6, large_ttft)])


def write_profile(path: Path) -> Path:
    def stage(name: str, coefficients: tuple, devices: tuple = ()) -> StageProfile:
        return StageProfile(StageFit(TERMS[name], coefficients, 0.0, 0.0, 1), (Measurement(1, 1.0),), devices)

    meta = ProfileMeta("cuda:0", "synthetic", "float32", "demo", "0" * 64, "0", "0", "dummy", "x", ())
    stages = {"prefill": stage("prefill", PREFILL), "decode": stage("decode", DECODE)}
    stages["encode"] = stage("encode", ENCODE)
    link = stage("transfer", (1e-5, 1e-11), ("cuda:0", "cuda:1"))
    Profile(meta, stages, {"cuda_ipc": link}).save(path)
    return path


def plan(tmp_path: Path, *flags: str) -> dict:
    parser = argparse.ArgumentParser(prog="epd")
    add_plan_parser(parser.add_subparsers(dest="command"), _HelpFormatter)
    out = tmp_path / "plan.json"
    workload = ["--num-requests", "80", "--seed", "5", "--burstiness", "3", "--slo-tpot", "1"]
    search = ["--gpus", "3", "--layouts", "1E+1P+1D", "--knob-trials", "0", "--policy-trials", "3"]
    profile = write_profile(tmp_path / "profile.json")
    args = parser.parse_args(
        ["plan", "--profile", str(profile), *workload, *search, *flags, "--json", str(out)]
    )
    assert run_plan(args) == 0
    return json.loads(out.read_text())


def test_the_plan_chooses_and_reports_the_queue_order(tmp_path: Path, capsys):
    doc = plan(tmp_path, "--classes", classes(0.3, 3.0))
    rows = {row["scheduling_policy"]: row for row in doc["ranked"] + doc["unranked"]}
    assert {"fcfs", "slo"} <= set(rows) and len(rows) == 1 + 3, "the plan's own, then 3 trials"
    winner = doc["winner"]
    best = max(rows.values(), key=lambda row: row["goodput"] or 0)
    assert winner["scheduling_policy"] == "slo" and winner["goodput"] == best["goodput"]
    assert rows["slo"]["goodput"] > rows["fcfs"]["goodput"], "deadline order serves more within the SLOs"
    # The serve command carries it (and the TTFT deadline it orders by), and parses back to it.
    argv = shlex.split(winner["serve_command"])
    assert argv[argv.index("--scheduling-policy") + 1] == "slo"
    parsed = engine_args_from(build_parser().parse_args(argv[1:]), winner["engine_args"]["model"])
    assert parsed.scheduling_policy == "slo"
    assert "scheduling policy slo" in capsys.readouterr().out


def test_without_a_ttft_slo_the_queue_order_is_not_searched(tmp_path: Path):
    doc = plan(tmp_path, "--classes", classes(None, None))
    assert {row["scheduling_policy"] for row in doc["ranked"] + doc["unranked"]} == {"fcfs"}
    assert doc["winner"]["scheduling_policy"] == "fcfs"


def test_policies_are_searched_only_on_the_stages_a_layout_has():
    from epd.cluster.layout import Layout

    assert layout_stages(Layout.parse("1E+1P+1D")) == ("encode", "prefill", "decode")
    assert layout_stages(Layout.parse("2EP+1D")) == ("prefill", "decode")
    assert layout_stages(Layout.parse("2EPD")) == ("prefill",)
    proposals = list(policy_proposals(("fcfs", "slo"), Layout.parse("2EP+1D"), "fcfs", {"fcfs"}))
    # The whole budget first, then one stage changed; encode (no E instance) follows prefill.
    assert proposals == ["slo", "encode=slo,prefill=slo,decode=fcfs", "encode=fcfs,prefill=fcfs,decode=slo"]
    assert all(StagePolicies.parse(p).encode == StagePolicies.parse(p).prefill for p in proposals)
