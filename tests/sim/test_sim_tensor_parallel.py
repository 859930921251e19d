"""`epd simulate` of layouts with tensor-parallel groups (`@tpN`): each instance's steps are priced
by the profile's costs at its degree, and a degree the profile lacks is refused before anything runs."""

from __future__ import annotations

from pathlib import Path

import pytest

from epd.cli import main
from epd.plan.profile import Profile, load_profile
from epd.plan.profile.features import TERMS
from epd.plan.profile.fit import StageFit
from epd.plan.profile.store import Measurement, ParallelProfile, ProfileMeta, StageProfile
from epd.sim.costs import LinearCosts, check_degrees, costs_at_degree

# prefill (step, token, attention_pair, sequence): ~43 ms a prompt of ~140 tokens at degree 1, and
# half that at degree 2; decode (step, sequence, context_token) and encode (batch, image, patch,
# patch_pair) cheap and the same at both degrees.
PREFILL = (1e-3, 3e-4, 0.0, 1e-4)
DECODE, ENCODE = (1e-3, 1e-4, 0.0), (1e-3, 0.0, 1e-6, 0.0)
WORKLOAD = ["--num-requests", "20", "--output-tokens", "8", "--image-size", "224x224", "--seed", "3"]
DEVICES = {
    "1E+1P+1D": "cuda:0,cuda:1,cuda:2",
    "1E+1P@tp2+1D": "cuda:0,cuda:1,cuda:2,cuda:3",
    "1E+1P+1D@tp2": "cuda:0,cuda:1,cuda:2,cuda:3",
    "1E+1P@tp4+1D": ",".join(f"cuda:{i}" for i in range(6)),
}


def stage(name: str, coefficients: tuple, devices: tuple = ()) -> StageProfile:
    return StageProfile(StageFit(TERMS[name], coefficients, 0.0, 0.0, 1), (Measurement(1, 1.0),), devices)


def tp2_profile(path: Path, tp2_prefill: tuple) -> Path:
    meta = ProfileMeta("cuda:0", "synthetic", "float32", "demo", "0" * 64, "0", "0", "dummy", "x", ())
    stages = {"prefill": stage("prefill", PREFILL), "decode": stage("decode", DECODE)}
    stages["encode"] = stage("encode", ENCODE)
    link = stage("transfer", (1e-5, 1e-11), ("cuda:0", "cuda:1"))
    tp2 = {"prefill": stage("prefill", tp2_prefill), "decode": stage("decode", DECODE)}
    parallel = {2: ParallelProfile(tp2, ("cuda:0", "cuda:1"), "nccl")}
    Profile(meta, stages, {"cuda_ipc": link}, parallel).save(path)
    return path


@pytest.fixture
def profile(tmp_path: Path) -> Path:
    return tp2_profile(tmp_path / "profile.json", tuple(c / 2 for c in PREFILL))


def ttft_p50(simulate, profile: Path, layout: str) -> float:
    flags = ["--profile", str(profile), "--layout", layout, "--devices", DEVICES[layout], "--rate", "1"]
    doc = simulate(*flags, *WORKLOAD, name=layout)
    run = doc["runs"][0]
    assert run["summary"]["completed"] == 20
    return run["summary"]["ttft"]["p50"]


def test_a_tp2_prefill_instance_prefills_at_the_profiles_tp2_cost(simulate, profile):
    tp1 = ttft_p50(simulate, profile, "1E+1P+1D")
    prefill_tp2 = ttft_p50(simulate, profile, "1E+1P@tp2+1D")
    decode_tp2 = ttft_p50(simulate, profile, "1E+1P+1D@tp2")
    # One prompt alone at a time (1 req/s): TTFT is encode + prefill + a transfer; the tp2 prefill
    # of ~140 tokens saves half of its ~43 ms.
    assert 0.015 < tp1 - prefill_tp2 < 0.03
    # The first token comes from P: a tp2 decode instance leaves TTFT exactly as it was.
    assert decode_tp2 == tp1


def test_a_degree_the_profile_lacks_is_refused(profile, tmp_path, capsys):
    layout = "1E+1P@tp4+1D"
    flags = ["--profile", str(profile), "--layout", layout, "--devices", DEVICES[layout]]
    assert main(["simulate", *flags, *WORKLOAD, "--rate", "1", "--out", str(tmp_path / "out")]) == 1
    said = capsys.readouterr().out
    assert "tensor-parallel degree 4" in said and "epd profile --tp 1,4" in " ".join(said.split())
    assert not (tmp_path / "out" / "results.json").exists()


def test_costs_at_each_degree(profile):
    costs = load_profile(profile).compute_costs()
    assert costs_at_degree(costs, 1) is costs
    tp2 = costs_at_degree(costs, 2)
    assert tp2.prefill.coefficients == tuple(c / 2 for c in PREFILL)
    assert tp2.encode == costs.encode  # the vision tower runs whole on rank 0 at every degree
    check_degrees(costs, [1, 2, 2])
    with pytest.raises(ValueError, match="degree 3"):
        check_degrees(costs, [1, 3])
    linear = LinearCosts()
    assert costs_at_degree(linear, 4) is linear  # no degrees known: every instance alike
