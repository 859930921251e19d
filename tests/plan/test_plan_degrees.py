"""`epd plan --tp 1,2`: the layouts of n GPUs include tensor-parallel P and D groups (each instance
taking its degree's GPUs), their capacity counts what a degree buys, and the plan simulates each with
the profile's costs at its degree; without --tp nothing changes."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from epd.cli import _HelpFormatter
from epd.cluster.layout import Layout, Role
from epd.plan.profile import Profile
from epd.plan.profile.features import TERMS
from epd.plan.profile.fit import StageFit
from epd.plan.profile.store import Measurement, ParallelProfile, ProfileMeta, StageProfile
from epd.plan.search.capacity import StageWork, capacity
from epd.plan.search.cli import add_plan_parser, run_plan
from epd.plan.search.layouts import candidate_layouts

# A prefill-bound profile (43 ms a ~140-token prompt, as in test_plan_search), whose tp2 prefill
# takes a quarter of that: one P@tp2 (2 GPUs) serves twice what two P at tp1 do.
PREFILL, DECODE, ENCODE = (1e-3, 3e-4, 0.0, 1e-4), (1e-3, 1e-4, 0.0), (1e-3, 0.0, 1e-6, 0.0)
FAST_TP2_PREFILL = tuple(c / 4 for c in PREFILL)
WORKLOAD = ["--num-requests", "40", "--output-tokens", "16", "--image-size", "224x224", "--seed", "5"]
SLOS = ["--slo-ttft", "0.5", "--slo-tpot", "0.1"]


def stage(name: str, coefficients: tuple, devices: tuple = ()) -> StageProfile:
    return StageProfile(StageFit(TERMS[name], coefficients, 0.0, 0.0, 1), (Measurement(1, 1.0),), devices)


def write_profile(path: Path, tp2_prefill: tuple | None) -> Path:
    meta = ProfileMeta("cuda:0", "synthetic", "float32", "demo", "0" * 64, "0", "0", "dummy", "x", ())
    stages = {"prefill": stage("prefill", PREFILL), "decode": stage("decode", DECODE)}
    stages["encode"] = stage("encode", ENCODE)
    link = stage("transfer", (1e-5, 1e-11), ("cuda:0", "cuda:1"))
    parallel = {}
    if tp2_prefill is not None:
        tp2 = {"prefill": stage("prefill", tp2_prefill), "decode": stage("decode", DECODE)}
        parallel[2] = ParallelProfile(tp2, ("cuda:0", "cuda:1"), "nccl")
    Profile(meta, stages, {"cuda_ipc": link}, parallel).save(path)
    return path


def plan_args(tmp_path: Path, tp2_prefill: tuple | None, *flags: str) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="epd")
    add_plan_parser(parser.add_subparsers(dest="command"), _HelpFormatter)
    profile = write_profile(tmp_path / "profile.json", tp2_prefill)
    return parser.parse_args(["plan", "--profile", str(profile), *WORKLOAD, *flags])


def plan(tmp_path: Path, tp2_prefill: tuple | None, *flags: str) -> dict:
    out = tmp_path / "plan.json"
    assert run_plan(plan_args(tmp_path, tp2_prefill, *flags, "--json", str(out))) == 0
    return json.loads(out.read_text())


def test_layouts_with_degrees_spend_exactly_the_gpus():
    assert candidate_layouts(4, degrees=(1,)) == candidate_layouts(4)
    assert [lay.text for lay in candidate_layouts(4, ("E", "P", "D"), (1, 2))] == [
        "2E+1P+1D", "1E+2P+1D", "1E+1P+2D", "1E+1P+1D@tp2", "1E+1P@tp2+1D",
    ]  # fmt: skip
    assert [lay.text for lay in candidate_layouts(2, degrees=(1, 2))] == [
        lay.text for lay in candidate_layouts(2)
    ] + ["1EPD@tp2"]
    for gpus in (1, 2, 3, 4):
        layouts = candidate_layouts(gpus, degrees=(1, 2, 4))
        texts = [lay.text for lay in layouts]
        assert len(texts) == len(set(texts))
        for layout in layouts:
            assert layout.num_devices == gpus and Layout.parse(layout.text) == layout
            for (_, roles), degree in zip(layout.groups, layout.group_degrees):
                assert degree == 1 or roles & {Role.PREFILL, Role.DECODE}
    only_tp2 = candidate_layouts(4, degrees=(2,))
    assert "2E+1PD@tp2" in [lay.text for lay in only_tp2]
    for layout in only_tp2:  # encoder-only groups stay at degree 1, every other at 2
        assert all(
            (d == 2) == (roles != {Role.ENCODE}) for (_, roles), d in zip(layout.groups, layout.group_degrees)
        )


def test_a_faster_degree_counts_as_more_instances_of_its_role():
    work = StageWork(encode=0.01, prefill=0.1, decode=0.01)
    tp2 = {2: StageWork(encode=0.01, prefill=0.04, decode=0.01)}
    assert capacity(Layout.parse("1E+1P+1D"), work, tp2).rate == pytest.approx(10)
    assert capacity(Layout.parse("1E+2P+1D"), work, tp2).rate == pytest.approx(20)
    faster = capacity(Layout.parse("1E+1P@tp2+1D"), work, tp2)
    assert faster.rate == pytest.approx(25) and faster.limiting == "P"
    # An instance holding several roles counts at its fastest among them: still an upper bound.
    assert capacity(Layout.parse("1EPD@tp2"), work, tp2).rate == pytest.approx(2.5 / 0.12)


def test_the_plan_gives_prefill_two_gpus_when_tp2_prefills_fast_enough(tmp_path: Path):
    flags = ["--gpus", "4", "--instance-kinds", "E,P,D", "--knob-trials", "0", "--tp", "1,2", *SLOS]
    doc = plan(tmp_path, FAST_TP2_PREFILL, *flags)
    looked_at = {row["layout"]: row["gpus"] for row in doc["ranked"] + doc["unranked"]}
    assert set(looked_at) == {"2E+1P+1D", "1E+2P+1D", "1E+1P+2D", "1E+1P+1D@tp2", "1E+1P@tp2+1D"}
    assert set(looked_at.values()) == {4}
    winner = doc["winner"]
    assert winner["layout"] == "1E+1P@tp2+1D" and winner["gpus"] == 4
    assert winner["engine_args"]["devices"] == "cuda:0,cuda:1,cuda:2,cuda:3"
    # Two tp1 P instances could not serve that rate even at their capacity estimate (skipped).
    two_p = next(row for row in doc["ranked"] + doc["unranked"] if row["layout"] == "1E+2P+1D")
    assert two_p["capacity"]["rate"] < winner["goodput"] and (two_p["goodput"] or 0) < winner["goodput"]
    assert doc["search"]["tp_degrees"] == [1, 2]


def test_without_tp_no_layout_is_tensor_parallel(tmp_path: Path):
    flags = ["--gpus", "4", "--instance-kinds", "E,P,D", "--knob-trials", "0", *SLOS]
    doc = plan(tmp_path, FAST_TP2_PREFILL, *flags)
    looked_at = {row["layout"] for row in doc["ranked"] + doc["unranked"]}
    assert looked_at == {"2E+1P+1D", "1E+2P+1D", "1E+1P+2D"}
    assert doc["winner"]["layout"] == "1E+2P+1D"


def test_degrees_the_profile_lacks_are_refused(tmp_path: Path, capsys):
    args = plan_args(tmp_path, None, "--gpus", "4", "--instance-kinds", "E,P,D", "--tp", "1,2", *SLOS)
    assert run_plan(args) == 1
    assert "epd profile --tp 1,2" in " ".join(capsys.readouterr().out.split())
