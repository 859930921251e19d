"""PNG plots of one or several results documents (several: a comparison, one curve or group each).

| file                 | what                                                                |
|----------------------|---------------------------------------------------------------------|
| ttft_cdf.png         | TTFT CDF, one line per (document, run)                              |
| attainment.png       | SLO attainment vs offered rate, the 90% line, goodput marked        |
| stage_breakdown.png  | mean seconds per server stage, a stacked bar per rate, grouped      |
| overview.png         | sweeps: attainment, TTFT p90 and the breakdown side by side         |
A plot whose data is missing (no SLO given, no `epd_timings`) is not written.
"""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")  # files only: never needs a display
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.axes import Axes  # noqa: E402

from epd.bench.serve.metrics import ATTAINMENT_TARGET, STAGE_ORDER, UNACCOUNTED  # noqa: E402

STAGE_COLOURS = dict(zip((*STAGE_ORDER, UNACCOUNTED), plt.get_cmap("tab10").colors))


def label_of(doc: dict, index: int) -> str:
    return doc.get("label") or doc["server"].get("model") or f"results {index + 1}"


def x_of(run: dict) -> float:
    """The offered rate; for closed-loop runs, the achieved request throughput."""
    rate = run["rate"]
    return rate if rate is not None and math.isfinite(rate) else run["summary"]["request_throughput"]


def write_plots(docs: list[dict], out_dir: Path) -> list[Path]:
    """Every plot the documents have data for; returns the files written."""
    written = []
    for name, draw in (
        ("ttft_cdf.png", draw_ttft_cdf),
        ("attainment.png", draw_attainment),
        ("stage_breakdown.png", draw_stages),
    ):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        if draw(ax, docs):
            written.append(_save(fig, out_dir / name))
        plt.close(fig)
    if len(docs) > 1 or len(docs[0]["runs"]) > 1:
        written += write_overview(docs, out_dir / "overview.png")
    return written


def write_overview(docs: list[dict], path: Path) -> list[Path]:
    fig, axes = plt.subplots(1, 3, figsize=(17, 4.8))
    drawn = [draw_attainment(axes[0], docs), draw_ttft_vs_rate(axes[1], docs), draw_stages(axes[2], docs)]
    for ax, ok in zip(axes, drawn):
        if not ok:
            ax.set_axis_off()
    written = [_save(fig, path)] if any(drawn) else []
    plt.close(fig)
    return written


def draw_ttft_cdf(ax: Axes, docs: list[dict]) -> bool:
    for i, doc in enumerate(docs):
        for run in doc["runs"]:
            ttfts = sorted(r["ttft"] for r in run["requests"] if r["ok"] and r["ttft"] is not None)
            if not ttfts:
                continue
            name = run["label"] if len(docs) == 1 else f"{label_of(doc, i)}, {run['label']}"
            ax.step(ttfts, [(k + 1) / len(ttfts) for k in range(len(ttfts))], where="post", label=name)
    slo = docs[0]["config"]["slo"]["ttft"]
    if slo is not None and ax.has_data():
        ax.axvline(slo, color="grey", linestyle=":", label=f"TTFT SLO {slo:g} s")
    ax.set(xlabel="time to first token (s)", ylabel="share of requests", title="TTFT CDF", ylim=(0, 1.02))
    return _finish(ax)


def draw_attainment(ax: Axes, docs: list[dict]) -> bool:
    for i, doc in enumerate(docs):
        points = sorted(
            (x_of(run), run["summary"]["slo_attainment"])
            for run in doc["runs"]
            if run["summary"]["slo_attainment"] is not None
        )
        if not points:
            continue
        line = ax.plot(*zip(*points), marker="o", label=label_of(doc, i))[0]
        goodput = doc["sweep"].get("goodput_rate")
        if goodput:
            ax.axvline(goodput, color=line.get_color(), linestyle="--", alpha=0.6)
    if not ax.has_data():
        return False
    ax.axhline(ATTAINMENT_TARGET, color="grey", linestyle=":", label=f"{ATTAINMENT_TARGET:.0%} target")
    ax.set(
        xlabel="request rate (req/s)",
        ylabel="SLO attainment",
        ylim=(-0.02, 1.02),
        title=f"SLO attainment ({_slo_text(docs[0]['config'])}); dashed: goodput",
    )
    return _finish(ax)


def _slo_text(config: dict) -> str:
    """The run's SLO, or, for a --classes mix, that each class has its own."""
    if (config.get("workload") or {}).get("classes"):
        return "each class its own SLO"
    slo = config["slo"]
    return f"TTFT <= {slo['ttft']} s, TPOT <= {slo['tpot']} s"


def draw_ttft_vs_rate(ax: Axes, docs: list[dict]) -> bool:
    for i, doc in enumerate(docs):
        points = sorted(
            (x_of(r), r["summary"]["ttft"]["p90"]) for r in doc["runs"] if r["summary"]["ttft"]["p90"]
        )
        if points:
            ax.plot(*zip(*points), marker="o", label=label_of(doc, i))
    ax.set(xlabel="request rate (req/s)", ylabel="seconds", title="TTFT p90")
    return _finish(ax)


def draw_stages(ax: Axes, docs: list[dict]) -> bool:
    """Stacked bars, one per run, grouped by document (the group's name under its bars)."""
    bars = [(i, run) for i, doc in enumerate(docs) for run in doc["runs"] if run.get("stages")]
    if not bars:
        return False
    positions, groups, x = [], {}, 0.0
    for k, (i, _) in enumerate(bars):
        if k and bars[k - 1][0] != i:
            x += 0.6  # a gap between groups
        positions.append(x)
        groups.setdefault(i, []).append(x)
        x += 1
    names = [s for s in STAGE_COLOURS if any(s in run["stages"] for _, run in bars)]
    bottoms = [0.0] * len(bars)
    for name in names:
        heights = [run["stages"].get(name, 0.0) for _, run in bars]
        ax.bar(positions, heights, bottom=bottoms, color=STAGE_COLOURS[name], label=name, width=0.8)
        bottoms = [b + h for b, h in zip(bottoms, heights)]
    ax.set_xticks(positions, [_rate_text(run) for _, run in bars], fontsize=8)
    if len(docs) > 1:
        for i, xs in groups.items():
            centre = sum(xs) / len(xs)
            ax.text(
                centre, -0.09, label_of(docs[i], i), transform=ax.get_xaxis_transform(), ha="center", va="top"
            )
    ax.set(ylabel="mean seconds per request", title="latency by stage (epd_timings), per rate (req/s)")
    return _finish(ax)


def _rate_text(run: dict) -> str:
    rate = run["rate"]
    return "inf" if rate is None or math.isinf(rate) else f"{rate:g}"


def _finish(ax: Axes) -> bool:
    """Legend if anything was drawn; False (nothing to show) otherwise."""
    if not ax.has_data():
        return False
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return True


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    return path
