"""`python -m epd.bench.role_switch_times` on the tiny checkpoint (three CPU instances): every
transition of a round is made and timed, each is printed and written to --out as it is made, and
a failed switch is kept in --out but left out of the summary."""

from __future__ import annotations

import json
from pathlib import Path

from epd.bench.role_switch_times import Report, main, parse_args
from epd.cluster.router.role_switch import PHASES

MOVES = ["P->D", "D->P", "P->E", "E->P"]


def test_a_round_is_timed_and_reported_as_it_goes(checkpoints: dict[str, Path], tmp_path: Path, capsys):
    out = tmp_path / "switch_times.json"
    args = ["--model", str(checkpoints["qwen2_5_vl"]), "--device", "cpu", "--repeats", "1"]
    main([*args, "--requests", "1", "--kv-cache-memory-bytes", str(16 << 20), "--out", str(out)])

    doc = json.loads(out.read_text())
    assert doc["complete"] and doc["startup_s"] > 0
    assert [f"{s['from']}->{s['to']}" for s in doc["switches"]] == MOVES
    for switch in doc["switches"]:
        assert switch["id"] == "P0" and switch["error"] is None and switch["state"] == "done"
        assert set(switch["timings"]) == set(PHASES) and switch["timings"]["total"] > 0
    assert list(doc["summary"]) == MOVES
    # Adding or dropping E rebuilt a part from the host copy; P <-> D only rewired the engine.
    assert doc["summary"]["E->P"]["memory"]["mean"] > 0 and doc["summary"]["P->D"]["memory"]["mean"] == 0

    printed = capsys.readouterr().out
    up, *switches = [line for line in printed.splitlines() if " up in " in line or "P0 " in line]
    assert "1E+1P+1PD up in" in up
    assert [line.split("] P0 ")[1].split(":")[0] for line in switches] == [
        "P -> D",
        "D -> P",
        "P -> E",
        "E -> P",
    ]
    assert printed.index("E -> P:") < printed.index("switch "), "each switch printed before the table"


def test_the_file_holds_every_switch_made_so_far_and_a_failure_is_not_summarized(tmp_path: Path, capsys):
    out = tmp_path / "partial.json"
    report = Report(parse_args(["--model", "unused", "--out", str(out)]))
    report.cluster_up()
    assert json.loads(out.read_text())["switches"] == []

    timings = dict.fromkeys(PHASES, 0.004)
    report.add({"id": "P0", "from": "P", "to": "D", "error": None, "timings": timings})
    doc = json.loads(out.read_text())
    assert not doc["complete"] and len(doc["switches"]) == 1
    assert doc["summary"]["P->D"]["total"] == {"mean": 0.004, "max": 0.004}

    failed = dict.fromkeys(PHASES, None)
    report.add({"id": "P0", "from": "D", "to": "E", "error": "refused", "timings": failed})
    doc = json.loads(out.read_text())
    assert len(doc["switches"]) == 2 and list(doc["summary"]) == ["P->D"]
    assert "P0 D -> E FAILED: refused" in capsys.readouterr().out
