"""The terminal summary: one rich table, a column per run (rate, or phase; then all phases)."""

from __future__ import annotations

import math
from collections.abc import Callable
from pathlib import Path

from rich.console import Console
from rich.table import Table

from epd.bench.serve.metrics import PERCENTILES

STATS = ("mean", *(f"p{p}" for p in PERCENTILES))
# (row title, summary key, scale, format)
LATENCIES = (("TTFT", "ttft", 1e3, "ms"), ("TPOT", "tpot", 1e3, "ms"), ("ITL", "itl", 1e3, "ms"))
LATENCIES += (("E2E", "e2e", 1.0, "s"),)


def _num(value: float | None, fmt: str = "{:.2f}") -> str:
    return "-" if value is None else fmt.format(value)


def _rows() -> list[tuple[str, Callable[[dict], str]]]:
    rows: list[tuple[str, Callable[[dict], str]]] = [
        ("completed / failed", lambda s: f"{s['completed']} / {s['failed']}"),
        ("duration (s)", lambda s: _num(s["duration_s"])),
        ("requests/s", lambda s: _num(s["request_throughput"], "{:.3f}")),
        ("output tokens/s", lambda s: _num(s["output_throughput"], "{:.1f}")),
        ("total tokens/s", lambda s: _num(s["total_token_throughput"], "{:.1f}")),
    ]
    for title, key, scale, unit in LATENCIES:
        for stat in STATS:
            rows.append(
                (f"{title} {stat} ({unit})", lambda s, k=key, st=stat, sc=scale: _scaled(s[k][st], sc))
            )
    rows += [
        ("SLO attainment", lambda s: _num(s["slo_attainment"], "{:.1%}")),
        ("goodput (req/s)", lambda s: _num(s["goodput"], "{:.3f}")),
        ("answer accuracy", lambda s: _num(s["accuracy"], "{:.1%}")),
    ]
    return rows


def _scaled(value: float | None, scale: float) -> str:
    return _num(None if value is None else value * scale)


def summary_table(doc: dict) -> Table:
    title = f"epd bench: {doc.get('label') or doc['server']['model']} ({doc['config']['workload']['kind']})"
    table = Table(title=title, title_justify="left")
    table.add_column("metric")
    summaries = [run["summary"] for run in doc["runs"]]
    for run in doc["runs"]:
        table.add_column(run["label"], justify="right")
    if doc.get("overall") is not None:  # a phased run: its phases together
        table.add_column("all phases", justify="right")
        summaries.append(doc["overall"])
    for name, cell in _rows():
        values = [cell(summary) for summary in summaries]
        if any(v != "-" for v in values):  # skip rows this benchmark has nothing for
            table.add_row(name, *values)
    return table


def print_report(doc: dict, files: list[Path], console: Console) -> None:
    console.print(summary_table(doc))
    goodput = doc["sweep"]["goodput_rate"]
    if goodput is not None and len(doc["runs"]) > 1:
        target = doc["sweep"]["attainment_target"]
        console.print(f"goodput: {goodput:.3f} req/s (highest rate with SLO attainment >= {target:.0%})")
    for path in files:
        console.print(f"wrote {path}")


def comparison_table(docs: list[dict]) -> Table:
    """A row per (document, run): the figures a layout comparison is read from (latencies in ms)."""
    scored = any(run["summary"]["accuracy"] is not None for doc in docs for run in doc["runs"])
    table = Table(title="comparison (latencies in ms)", title_justify="left")
    table.add_column("label", no_wrap=True)
    for name in ("rate", "req/s", "TTFT p50", "TTFT p90", "TPOT p50", "attained", "goodput"):
        table.add_column(name, justify="right")
    if scored:
        table.add_column("accuracy", justify="right")
    for i, doc in enumerate(docs):
        goodput = doc["sweep"]["goodput_rate"]
        for k, run in enumerate(doc["runs"]):
            s = run["summary"]
            row = [
                (doc.get("label") or f"results {i + 1}") if k == 0 else "",
                "inf" if run["rate"] is None or math.isinf(run["rate"]) else f"{run['rate']:g}",
                _num(s["request_throughput"], "{:.3f}"),
                _scaled(s["ttft"]["p50"], 1e3),
                _scaled(s["ttft"]["p90"], 1e3),
                _scaled(s["tpot"]["p50"], 1e3),
                _num(s["slo_attainment"], "{:.1%}"),
                _num(goodput, "{:.3f}") if k == 0 else "",
            ]
            table.add_row(*row, *([_num(s["accuracy"], "{:.1%}")] if scored else []))
    return table
