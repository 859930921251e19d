"""A workload mixed of request classes (--classes): each request drawn from one class, with that
class's images, output length and SLO, which travels to the server and judges the request."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pytest

from epd.bench.serve.classes import parse_classes
from epd.bench.serve.client import RequestResult
from epd.bench.serve.metrics import summarize
from epd.bench.serve.spec import SLO, SizeBucket, WorkloadSpec
from epd.bench.serve.workload import build_requests
from epd.cli import main
from epd.sim.bench_requests import sampling_params

MIX = [
    {"name": "small", "share": 0.7, "images_per_request": 1, "image_size": "448x448",
     "output_tokens": 64, "slo_ttft": 0.5, "slo_tpot": 0.03},
    {"name": "large", "share": 0.3, "images_per_request": "5-6", "image_size": "1344x1344",
     "output_tokens": 256, "slo_ttft": 3},
]  # fmt: skip


def test_classes_parse_from_inline_json_or_a_file(tmp_path: Path):
    small, large = parse_classes(json.dumps(MIX))
    assert (small.name, small.share, small.images_per_request) == ("small", 0.7, (1, 1))
    assert small.image_sizes == (SizeBucket(448, 448),) and small.slo == SLO(0.5, 0.03)
    assert large.images_per_request == (5, 6) and large.slo == SLO(3.0, None)
    path = tmp_path / "mix.json"
    path.write_text(json.dumps(MIX))
    assert parse_classes(str(path)) == (small, large)


@pytest.mark.parametrize(
    ("classes", "says"),
    [
        ("{}", "non-empty JSON list"),
        ('[{"name": "a"}]', "needs a share"),
        ('[{"share": 1, "colour": "red"}]', "unknown keys"),
        ('[{"share": 1, "slo_ttft": -1}]', "positive number of seconds"),
        ('[{"share": 1, "image_size": "big"}]', "WxH"),
        ('[{"name": "a", "share": 1}, {"name": "a", "share": 1}]', "repeat"),
    ],
)
def test_bad_classes_are_refused_with_the_reason(classes: str, says: str):
    with pytest.raises(ValueError, match=says):
        parse_classes(classes)


def test_each_request_is_of_one_class_and_carries_its_slo():
    spec = WorkloadSpec(classes=parse_classes(json.dumps(MIX)))
    requests = build_requests(spec, 400, seed=3, namespace="t", tokenizer_dir=None, image_url=_name)
    counts = Counter(r.request_class for r in requests)
    assert 240 <= counts["small"] <= 320 and counts["small"] + counts["large"] == 400  # 0.7 of 400
    for r in requests:
        if r.request_class == "small":
            assert (r.num_images, r.max_tokens, r.slo) == (1, 64, SLO(0.5, 0.03))
            assert (r.extra["slo_ttft"], r.extra["slo_tpot"]) == (0.5, 0.03)
            assert _sizes(r) == {"448x448"}
        else:
            assert r.num_images in (5, 6) and r.max_tokens == 256 and "slo_tpot" not in r.extra
            assert _sizes(r) == {"1344x1344"}
    # The server's fields become the simulated request's deadline and TPOT target.
    params = sampling_params(requests[0], prompt_len=100, max_model_len=4096)
    assert (params.slo_ttft, params.slo_tpot) == (requests[0].slo.ttft, requests[0].slo.tpot)


def test_every_run_sends_the_same_sequence_of_classes_with_its_own_images():
    spec = WorkloadSpec(classes=parse_classes(json.dumps(MIX)))
    run0, run1 = (build_requests(spec, 60, 3, f"run{i}", None, image_url=_name) for i in range(2))
    assert [r.request_class for r in run0] == [r.request_class for r in run1]
    assert {"small", "large"} == {r.request_class for r in run0}
    assert not _urls(run0) & _urls(run1)  # fresh images: no run finds another's in the server's caches
    other_seed = build_requests(spec, 60, 4, "run0", None, image_url=_name)
    assert [r.request_class for r in other_seed] != [r.request_class for r in run0]


def test_each_request_is_judged_by_its_class_slo():
    def result(cls: str, ttft: float, slo_ttft: float) -> RequestResult:
        r = RequestResult(0, 0.0, ok=True, ttft=ttft, e2e=ttft, output_tokens=1)
        r.request_class, r.slo_ttft = cls, slo_ttft
        return r

    results = [result("small", 0.4, 0.5), result("small", 0.6, 0.5), result("large", 2.0, 3.0)]
    summary = summarize(results, duration=1.0, slo=SLO())  # the run sets no SLO of its own
    assert summary["slo_attainment"] == pytest.approx(2 / 3) and summary["goodput"] == 2.0
    assert summary["classes"]["small"]["slo_attainment"] == 0.5
    assert summary["classes"]["large"]["slo_attainment"] == 1.0
    assert summary["classes"]["small"]["requests"] == 2


def test_simulate_reports_each_class(tmp_path: Path):
    out = tmp_path / "sim"
    args = ["simulate", "--layout", "1E+1P+1D", "--classes", json.dumps(MIX), "--rate", "4"]
    args += ["--num-requests", "30", "--scheduling-policy", "slo", "--prompt-tokens", "16", "--seed", "1"]
    assert main([*args, "--out", str(out)]) == 0
    summary = json.loads((out / "results.json").read_text())["runs"][0]["summary"]
    assert set(summary["classes"]) == {"small", "large"}
    assert sum(c["requests"] for c in summary["classes"].values()) == 30


def test_classes_need_the_synthetic_workload(capsys):
    with pytest.raises(SystemExit):
        main(["simulate", "--workload", "shapes", "--classes", json.dumps(MIX)])
    assert "--workload synthetic" in capsys.readouterr().err


def _name(width: int, height: int, seed: int) -> str:
    return f"sim-image:{width}x{height}:{seed}"


def _urls(requests) -> set[str]:
    return {p["image_url"]["url"] for r in requests for p in r.messages[0]["content"] if "image_url" in p}


def _sizes(request) -> set[str]:
    parts = request.messages[0]["content"]
    return {p["image_url"]["url"].split(":")[1] for p in parts if p["type"] == "image_url"}
