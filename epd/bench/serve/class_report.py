"""Results files of a --classes workload side by side (the same mix served several ways, e.g. by the
fcfs and the slo scheduling policy): a row per run and class, and each file's goodput next to the
first file's. `epd bench plot` prints both, and writes the rows as OUT/classes.md, when the files
hold classes.

| figure                      | definition                                                              |
|-----------------------------|-------------------------------------------------------------------------|
| attained                    | share of the row's requests within their own class's SLO (metrics.py)   |
| in SLO req/s                | those requests per second of the run (metrics.py's run goodput); a      |
|                             | class row: the class's own                                              |
| goodput rate (a file)       | the sweep's: highest rate with attainment >= 90%, interpolated          |
| attainment at base's rate   | a file's attainment-vs-rate curve read (linearly) at the first file's   |
|                             | goodput rate: "the attainment at the same load"                         |
"""

from __future__ import annotations

import math

from rich.table import Table

COLUMNS = ("label", "rate", "class", "requests", "attained", "in SLO req/s")
COLUMNS += ("TTFT p50 s", "TTFT p99 s", "TPOT p50 ms", "TPOT p99 ms")
ALL = "all"


def has_classes(docs: list[dict]) -> bool:
    return any("classes" in run["summary"] for doc in docs for run in doc["runs"])


def class_rows(docs: list[dict]) -> list[list[str]]:
    """A row per (file, run): the whole run, then one per class (label and rate on the first)."""
    rows = []
    for i, doc in enumerate(docs):
        for k, run in enumerate(doc["runs"]):
            summary = run["summary"]
            first = [_label(doc, i) if k == 0 else "", _rate(run["rate"])]
            rows.append(first + _cells(ALL, _whole(summary), summary["goodput"]))
            for name, cls in summary.get("classes", {}).items():
                rows.append(["", "", *_cells(name, cls, _class_goodput(cls, summary["duration_s"]))])
    return rows


def class_table(docs: list[dict]) -> Table:
    table = Table(title="per class (each judged by its own SLO)", title_justify="left")
    for k, name in enumerate(COLUMNS):
        table.add_column(name, justify="left" if k < 3 else "right", no_wrap=k == 0)
    for row in class_rows(docs):
        table.add_row(*row)
    return table


def markdown(docs: list[dict]) -> str:
    """The rows as a Markdown table (what BENCHMARKS.md quotes)."""
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    lines += ["| " + " | ".join(row) + " |" for row in class_rows(docs)]
    return "\n".join(lines) + "\n"


def goodput_lines(docs: list[dict]) -> list[str]:
    """Each file's goodput rate; then, against the first file's, each one's attainment at that
    rate and its goodput's change."""
    lines = [f"{_label(doc, i)}: goodput {_goodput_text(doc)}" for i, doc in enumerate(docs)]
    base, base_rate = docs[0], docs[0]["sweep"]["goodput_rate"]
    if len(docs) < 2 or not base_rate:
        return lines
    reached = []
    for i, doc in enumerate(docs):
        at = attainment_at(doc, base_rate)
        reached.append(f"{_label(doc, i)} {'-' if at is None else f'{at:.1%}'}")
    at_base = f"SLO attainment at {_label(base, 0)}'s goodput rate ({base_rate:.3g} req/s): "
    lines.append(at_base + ", ".join(reached))
    for i, doc in enumerate(docs[1:], start=1):
        rate = doc["sweep"]["goodput_rate"]
        if rate is not None:
            lines.append(f"{_label(doc, i)} vs {_label(base, 0)}: goodput {rate / base_rate - 1:+.0%}")
    return lines


def attainment_at(doc: dict, rate: float) -> float | None:
    """The file's attainment at `rate`, linear between its two nearest measured rates; None
    outside the rates it ran (or with no SLO)."""
    points = sorted(
        (run["rate"], run["summary"]["slo_attainment"])
        for run in doc["runs"]
        if run["summary"]["slo_attainment"] is not None and _finite(run["rate"])
    )
    for (r0, a0), (r1, a1) in zip(points, points[1:]):
        if r0 <= rate <= r1:
            return a0 + (a1 - a0) * (rate - r0) / (r1 - r0)
    return next((a for r, a in points if math.isclose(r, rate)), None)


def _goodput_text(doc: dict) -> str:
    rate, target = doc["sweep"]["goodput_rate"], doc["sweep"]["attainment_target"]
    if rate is None:
        return "- (no SLO or no finite rate)"
    rates = [r for r in doc["sweep"]["rates"] if _finite(r)]
    note = ""
    if rate == 0:
        note = ", no rate reached it"
    elif rates and rate >= max(rates):
        note = ", every rate reached it: a lower bound"
    return f"{rate:.3f} req/s (highest rate with SLO attainment >= {target:.0%}{note})"


def _whole(summary: dict) -> dict:
    requests = summary["completed"] + summary["failed"]
    return {"requests": requests, **{k: summary[k] for k in ("slo_attainment", "ttft", "tpot")}}


def _class_goodput(cls: dict, duration: float) -> float | None:
    reach = cls["slo_attainment"]
    return None if reach is None else reach * cls["requests"] / max(duration, 1e-9)


def _cells(name: str, figures: dict, goodput: float | None) -> list[str]:
    return [
        name,
        str(figures["requests"]),
        _num(figures["slo_attainment"], "{:.1%}"),
        _num(goodput, "{:.3f}"),
        _num(figures["ttft"]["p50"], "{:.3f}"),
        _num(figures["ttft"]["p99"], "{:.3f}"),
        _num(_ms(figures["tpot"]["p50"]), "{:.1f}"),
        _num(_ms(figures["tpot"]["p99"]), "{:.1f}"),
    ]


def _finite(rate: float | None) -> bool:
    return rate is not None and math.isfinite(rate)


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else seconds * 1e3


def _num(value: float | None, fmt: str) -> str:
    return "-" if value is None else fmt.format(value)


def _rate(rate: float | None) -> str:
    return "inf" if rate is None or math.isinf(rate) else f"{rate:g}"


def _label(doc: dict, index: int) -> str:
    return doc.get("label") or doc["server"].get("model") or f"results {index + 1}"
