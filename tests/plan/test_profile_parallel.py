"""`epd profile --tp 1,2` on the tiny checkpoint, on the CPU: the prefill and decode steps of a real
two-rank instance (rank 0's engine compute driving a worker over gloo) measured, fitted and saved
next to degree 1's; old profiles (no "parallel") still load, at degree 1 only."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest

from epd.plan.profile import Profile, load_profile
from epd.plan.profile.__main__ import main

GRIDS = [
    "--decode-batches", "1,4", "--decode-contexts", "32,128",
    "--prefill-seqs", "1", "--prefill-tokens", "8,64", "--prefill-contexts", "0,32",
    "--mixed-decodes", "2", "--encode-images", "1", "--encode-sides", "56,112",
    "--warmup", "1", "--repeats", "2",
]  # fmt: skip


@pytest.fixture(scope="module")
def tp_profile(checkpoints: dict[str, Path], tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, str]:
    path = tmp_path_factory.mktemp("tp-profile") / "profile.json"
    flags = ["--model", str(checkpoints["qwen2_5_vl"]), "--device", "cpu", "--out", str(path)]
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        code = main([*flags, "--stages", "prefill,decode,encode", "--tp", "1,2", *GRIDS])
    assert code == 0, printed.getvalue()
    return path, printed.getvalue()


def shapes(profile: Profile, stage: str, degree: int) -> list:
    stages = profile.stages if degree == 1 else profile.parallel[degree].stages
    return [m.shape for m in stages[stage].measurements]


def test_each_degree_times_the_same_steps(tp_profile):
    path, printed = tp_profile
    profile = load_profile(path)
    assert profile.degrees == (1, 2)
    tp2 = profile.parallel[2]
    assert tp2.devices == ("cpu", "cpu") and tp2.backend == "gloo" and tp2.graph_sizes == ()
    assert set(tp2.stages) == {"prefill", "decode"}  # the tower runs whole on rank 0: degree 1's
    for stage in ("prefill", "decode"):
        assert shapes(profile, stage, 2) == shapes(profile, stage, 1) != []
        assert all(m.seconds > 0 for m in tp2.stages[stage].measurements)
        assert f"| {stage} @tp2 | {len(shapes(profile, stage, 2))} |" in printed


def test_the_simulator_prices_each_degree_with_its_own_fits(tp_profile):
    profile = load_profile(tp_profile[0])
    costs = profile.compute_costs()
    assert costs.at_degree(1) is costs and costs.prefill == profile.stages["prefill"].fit
    tp2 = costs.at_degree(2)
    assert tp2.prefill == profile.parallel[2].stages["prefill"].fit
    assert tp2.decode == profile.parallel[2].stages["decode"].fit
    assert tp2.encode == costs.encode and tp2.graph_sizes == ()
    with pytest.raises(ValueError, match=r"degree 4 \(measured: 1, 2\).*--tp 1,4"):
        costs.at_degree(4)


def test_the_file_round_trips_and_an_old_profile_is_degree_1(tp_profile, tmp_path):
    data = json.loads(tp_profile[0].read_text())
    assert json.loads(json.dumps(Profile.from_json(data).to_json())) == data
    del data["parallel"]  # as every profile before degrees were measured
    old = tmp_path / "old.json"
    old.write_text(json.dumps(data))
    profile = load_profile(old)
    assert profile.degrees == (1,) and profile.parallel == {}
    assert "parallel" not in profile.to_json()
    with pytest.raises(ValueError, match="degree 2"):
        profile.compute_costs().at_degree(2)


def test_a_degree_the_model_cannot_be_split_in_is_refused_before_measuring(checkpoints, tmp_path, capsys):
    out = tmp_path / "never.json"
    with pytest.raises(SystemExit) as exit_info:
        main(["--model", str(checkpoints["qwen2_5_vl"]), "--device", "cpu", "--tp", "1,3", "--out", str(out)])
    assert exit_info.value.code == 2
    assert "cannot be split over 3 ranks" in capsys.readouterr().err
    assert not out.exists()
