"""Results of a --classes mix served two ways, side by side (epd.bench.serve.class_report): a row per
run and class, each file's goodput rate, and the second's attainment read at the first's rate."""

from __future__ import annotations

from pathlib import Path

import pytest

from epd.bench.serve.class_report import attainment_at, class_rows, goodput_lines, has_classes
from epd.bench.serve.classes import parse_classes
from epd.bench.serve.client import RequestResult
from epd.bench.serve.results import document, run_record, save
from epd.bench.serve.spec import SLO, ArrivalSpec, BenchSpec, WorkloadSpec
from epd.cli import main

MIX = (
    '[{"name": "small", "share": 0.7, "slo_ttft": 1, "slo_tpot": 0.05},'
    ' {"name": "large", "share": 0.3, "slo_ttft": 4, "slo_tpot": 0.05}]'
)
RATES = (2.0, 4.0, 6.0)
# Requests (of 20 per run) within their SLO at each rate: fcfs falls below 90% between 2 and 4
# req/s, slo between 4 and 6.
MET = {"fcfs": (20, 16, 10), "slo": (20, 19, 14)}


def results(met: int, total: int = 20) -> list[RequestResult]:
    """`total` requests, every second one "large"; the first `met` within their class's TTFT."""
    out = []
    for i in range(total):
        name, slo_ttft = ("large", 4.0) if i % 2 else ("small", 1.0)
        ttft = 0.5 * slo_ttft if i < met else 2 * slo_ttft
        r = RequestResult(i, 0.0, ok=True, ttft=ttft, e2e=ttft + 0.05, output_tokens=3)
        r.request_class, r.slo_ttft, r.slo_tpot = name, slo_ttft, 0.05
        out.append(r)
    return out


def doc(label: str, met: tuple[int, ...] | None = None) -> dict:
    classes = parse_classes(MIX) if met is not None else ()
    spec = BenchSpec(base_url="http://x", label=label, workload=WorkloadSpec(classes=classes))
    runs = []
    for rate, n in zip(RATES, met or (20, 20, 20)):
        rs = results(n)
        if met is None:
            for r in rs:
                r.request_class = r.slo_ttft = r.slo_tpot = None
        runs.append(run_record(ArrivalSpec(rate, "gamma", 3.0), rs, duration=10.0, slo=SLO(2.0)))
    return document(spec, {"model": "m", "base_url": "http://x"}, runs)


def test_goodput_of_each_and_attainment_at_the_first_ones_rate():
    fcfs, slo = doc("fcfs", MET["fcfs"]), doc("slo", MET["slo"])
    assert fcfs["sweep"]["goodput_rate"] == pytest.approx(3.0)  # 100% at 2, 80% at 4
    assert slo["sweep"]["goodput_rate"] == pytest.approx(4.4)  # 95% at 4, 70% at 6
    assert attainment_at(slo, 3.0) == pytest.approx(0.975)
    assert attainment_at(slo, 4.0) == pytest.approx(0.95) and attainment_at(slo, 7.0) is None
    lines = goodput_lines([fcfs, slo])
    assert lines[0].startswith("fcfs: goodput 3.000 req/s") and lines[1].startswith("slo: goodput 4.400")
    assert lines[2] == "SLO attainment at fcfs's goodput rate (3 req/s): fcfs 90.0%, slo 97.5%"
    assert lines[3] == "slo vs fcfs: goodput +47%"


def test_a_row_per_run_and_class_each_judged_by_its_own_slo():
    rows = class_rows([doc("fcfs", MET["fcfs"]), doc("slo", MET["slo"])])
    assert len(rows) == 2 * len(RATES) * 3  # per run: all, large, small
    whole, large, small = rows[3:6]  # fcfs at 4 req/s: 16 of 20 met, the misses 16..19
    assert whole[:6] == ["", "4", "all", "20", "80.0%", "1.600"]
    assert large[2:6] == ["large", "10", "80.0%", "0.800"] and small[2:6] == ["small", "10", "80.0%", "0.800"]
    assert (whole[6], whole[7], whole[8]) == ("2.000", "8.000", "25.0")  # TTFT s p50, p99; TPOT ms
    assert rows[9][:3] == ["slo", "2", "all"]


def test_a_lone_file_or_one_that_never_reached_the_target():
    never = doc("fcfs", (10, 10, 10))
    assert goodput_lines([never]) == [
        "fcfs: goodput 0.000 req/s (highest rate with SLO attainment >= 90%, no rate reached it)"
    ]
    lines = goodput_lines([never, doc("slo", MET["slo"])])
    assert len(lines) == 2  # no rate to compare at
    assert "a lower bound" in goodput_lines([doc("slo", (20, 20, 20))])[0]


def test_bench_plot_prints_and_writes_the_class_table(tmp_path: Path, capsys):
    paths = []
    for label in ("fcfs", "slo"):
        (tmp_path / label).mkdir()
        paths.append(str(save(doc(label, MET[label]), tmp_path / label)))
    out = tmp_path / "compare"
    assert main(["bench", "plot", *paths, "--labels", "fcfs,slo", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "per class" in printed and "slo vs fcfs: goodput +47%" in printed
    table = (out / "classes.md").read_text()
    assert "| fcfs | 2 | all | 20 | 100.0% |" in table and "|  |  | large | 10 | 100.0% |" in table
    assert "- SLO attainment at fcfs's goodput rate (3 req/s): fcfs 90.0%, slo 97.5%" in table
    assert (out / "attainment.png").stat().st_size > 1000


def test_files_without_classes_get_no_class_table(tmp_path: Path):
    plain = doc("plain")
    assert not has_classes([plain])
    (tmp_path / "a").mkdir()
    path = save(plain, tmp_path / "a")
    assert main(["bench", "plot", str(path), "--out", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "out" / "classes.md").exists()
