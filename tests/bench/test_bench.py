"""`epd bench` against a real server (tiny model, 1EPD, CPU) at low rates: results, plots, accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from PIL import Image

from epd.bench.serve.metrics import attainment
from epd.bench.serve.results import load, results_of
from epd.bench.serve.spec import SLO
from epd.cli import main

from .conftest import MODEL_NAME

SYNTHETIC = ["--image-size", "64x48,96x64:0.5", "--images-per-request", "0-2", "--image-reuse", "0.3"]
SYNTHETIC += ["--prompt-tokens", "24", "--output-tokens", "6", "--warmup", "1", "--no-progress"]
LOOSE = ["--slo-ttft", "60", "--slo-tpot", "10"]
PLOTS = ("ttft_cdf.png", "attainment.png", "stage_breakdown.png", "overview.png")
TOP_KEYS = {"format", "label", "created", "git_revision", "config", "server", "runs", "sweep"}
RUN_KEYS = {"rate", "label", "arrival", "summary", "stages", "requests"}
SUMMARY_KEYS = {"completed", "failed", "duration_s", "total_prompt_tokens", "total_output_tokens"}
SUMMARY_KEYS |= {"request_throughput", "output_throughput", "total_token_throughput", "ttft", "tpot", "itl"}
SUMMARY_KEYS |= {"e2e", "slo_attainment", "goodput", "accuracy"}
REQUEST_KEYS = {
    "index",
    "scheduled_s",
    "sent_s",
    "ok",
    "error",
    "ttft",
    "e2e",
    "itl",
    "tpot",
    "output_tokens",
}
REQUEST_KEYS |= {
    "prompt_tokens",
    "prompt_text_tokens",
    "num_images",
    "text",
    "expected",
    "correct",
    "epd_timings",
    "request_class",  # a --classes workload's; with its own SLO
    "slo_ttft",
    "slo_tpot",
}


def bench(url: str, out: Path, *args: str) -> dict:
    assert main(["bench", "--base-url", url + "/v1", "--out", str(out), *args]) == 0
    return json.loads((out / "results.json").read_text())


@pytest.fixture(scope="module")
def synthetic(server, tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("synthetic")
    doc = bench(server.url, out, *SYNTHETIC, *LOOSE, "--rates", "2,4", "--num-requests", "8", "--label", "a")
    return out, doc


def test_results_json_has_every_field(synthetic):
    _, doc = synthetic
    assert set(doc) == TOP_KEYS and doc["format"] == "epd-bench/1"
    assert doc["git_revision"] is None or len(doc["git_revision"]["commit"]) == 40
    assert doc["server"]["models"]["data"][0]["id"] == MODEL_NAME == doc["server"]["model"]
    assert doc["server"]["epd_timings"] is True  # auto: the server says it is epd
    assert doc["config"]["workload"]["image_reuse"] == 0.3 and doc["config"]["slo"] == {
        "ttft": 60,
        "tpot": 10,
    }
    assert [run["rate"] for run in doc["runs"]] == [2.0, 4.0] == doc["sweep"]["rates"]
    for run in doc["runs"]:
        assert set(run) == RUN_KEYS and SUMMARY_KEYS <= set(run["summary"])
        assert run["summary"]["completed"] == 8 and run["summary"]["failed"] == 0
        assert {"prefill", "decode", "preprocess"} <= set(run["stages"])
        assert len(run["requests"]) == 8
        for r in run["requests"]:
            assert set(r) == REQUEST_KEYS
            assert r["ok"] and r["output_tokens"] == 6  # ignore_eos: exactly the asked length
            assert r["prompt_text_tokens"] == 24  # the model's tokenizer counted the text
            assert r["prompt_tokens"] > 24 and r["epd_timings"]["stages"]
            assert r["sent_s"] >= r["scheduled_s"]


def test_ttft_within_e2e_for_every_request(synthetic):
    _, doc = synthetic
    for run in doc["runs"]:
        for r in run["requests"]:
            assert 0 < r["ttft"] <= r["e2e"]
            assert r["tpot"] == pytest.approx((r["e2e"] - r["ttft"]) / (r["output_tokens"] - 1))
            assert sum(r["itl"]) <= r["e2e"] - r["ttft"] + 1e-6


def test_attainment_falls_as_the_slo_tightens(synthetic):
    out, doc = synthetic
    assert [run["summary"]["slo_attainment"] for run in doc["runs"]] == [1.0, 1.0]  # loose SLOs
    assert doc["sweep"]["goodput_rate"] == 4.0
    results = [r for run in load(out)["runs"] for r in results_of(run)]
    ttfts = sorted(r.ttft for r in results)
    tightening = [SLO(ttft=t, tpot=10.0) for t in [60.0, *reversed(ttfts), 1e-9]]
    reached = [attainment(results, slo) for slo in tightening]
    assert reached[0] == 1.0 and reached[-1] == 0.0
    assert all(a >= b for a, b in zip(reached, reached[1:]))
    assert attainment(results, SLO(ttft=60.0, tpot=1e-9)) == 0.0  # the TPOT half alone


def test_pngs_are_written_and_not_empty(synthetic):
    out, _ = synthetic
    for name in PLOTS:
        with Image.open(out / name) as img:
            assert img.format == "PNG" and img.width > 300 and img.height > 200
            darkest, lightest = img.convert("L").getextrema()
            assert lightest - darkest > 100  # something drawn on the white


def test_shapes_runs_report_answer_accuracy(server, tmp_path: Path):
    args = ["--workload", "shapes", "--images-per-request", "1-2", "--output-tokens", "12", "--warmup", "0"]
    doc = bench(server.url, tmp_path, *args, "--num-requests", "4", "--rate", "4", "--no-progress")
    summary, requests = doc["runs"][0]["summary"], doc["runs"][0]["requests"]
    assert 0.0 <= summary["accuracy"] <= 1.0  # a random tiny model scores about 0
    assert all(r["expected"] and isinstance(r["correct"], bool) for r in requests)
    assert summary["accuracy"] == sum(r["correct"] for r in requests) / len(requests)


def test_closed_loop_keeps_at_most_max_concurrency_in_flight(server, tmp_path: Path):
    doc = bench(server.url, tmp_path, *SYNTHETIC, "--max-concurrency", "2", "--num-requests", "6")
    run = doc["runs"][0]
    assert run["rate"] is None and run["label"] == "closed, 2 at once"  # infinite rate: null in JSON
    spans = [(r["sent_s"], r["sent_s"] + r["e2e"]) for r in run["requests"]]
    for start, _ in spans:  # requests in flight just after each send
        assert sum(s <= start + 1e-9 < e for s, e in spans) <= 2


def test_jsonl_replay_and_comparison_plot(server, synthetic, tmp_path: Path):
    lines = [{"messages": [{"role": "user", "content": f"say {i}"}], "max_tokens": 4} for i in range(3)]
    data = tmp_path / "requests.jsonl"
    data.write_text("\n".join(map(json.dumps, lines)))
    args = ["--workload", "jsonl", "--dataset-path", str(data), "--rates", "3,6", "--num-requests", "3"]
    doc = bench(server.url, tmp_path / "jsonl", *args, *LOOSE, "--label", "b", "--no-progress")
    assert all(r["ok"] and r["num_images"] == 0 for run in doc["runs"] for r in run["requests"])
    first, _ = synthetic
    out = tmp_path / "compare"
    assert (
        main(["bench", "plot", str(first / "results.json"), str(tmp_path / "jsonl"), "--out", str(out)]) == 0
    )
    assert all((out / name).stat().st_size > 1000 for name in PLOTS)


def test_unreachable_server_is_a_clear_error(tmp_path: Path, capsys):
    assert main(["bench", "--base-url", "http://127.0.0.1:9", "--out", str(tmp_path), "--no-progress"]) == 1
    assert "cannot read http://127.0.0.1:9/v1/models" in capsys.readouterr().out
