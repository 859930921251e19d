"""`epd bench sweep`: the same workload against one fresh server per layout, compared side by side.

    for each layout: epd serve (same model, same devices) -> epd bench (every rate) -> stop
                     [--compare-sim: epd simulate of that server and workload -> OUT/<layout>/sim/]
    then: comparison plots and table over all layouts [and measured vs simulated]

Each layout's results and plots go to OUT/<layout>/, the comparison to OUT/. Same seed, same
requests and arrival times for every layout, so the layouts differ only in how they serve.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

from rich.console import Console

from epd.bench.serve.bench import run_benchmark
from epd.bench.serve.launcher import LocalServer
from epd.bench.serve.plots import write_plots
from epd.bench.serve.report import comparison_table
from epd.bench.serve.sim_compare import comparison_rows
from epd.bench.serve.sim_compare import comparison_table as sim_comparison_table
from epd.bench.serve.spec import BenchSpec


@dataclasses.dataclass(frozen=True)
class SweepSpec:
    model: str
    layouts: tuple[str, ...]
    devices: str = "cpu"
    serve_args: tuple[str, ...] = ()
    start_timeout: float = 600.0


def serve_args(sweep: SweepSpec, layout: str) -> list[str]:
    # One name is shared by every instance (--device); a list is one device per instance in order.
    device_flag = "--devices" if "," in sweep.devices else "--device"
    return ["--model", sweep.model, "--layout", layout, device_flag, sweep.devices, *sweep.serve_args]


# (the server's command line, the layout's folder) -> the simulated results document
Simulate = Callable[[list[str], Path], dict]


def run_sweep(
    sweep: SweepSpec, bench: BenchSpec, out_dir: Path, console: Console, simulate: Simulate | None = None
) -> list[dict]:
    """Benchmark every layout (and simulate it, if asked); write per-layout and comparison outputs;
    return the measured documents."""
    docs, predicted = [], []
    for layout in sweep.layouts:
        layout_dir = out_dir / layout
        layout_dir.mkdir(parents=True, exist_ok=True)
        console.rule(f"layout {layout}")
        argv = serve_args(sweep, layout)
        with LocalServer(argv, layout_dir / "server.log", sweep.start_timeout) as srv:
            spec = dataclasses.replace(bench, base_url=srv.url, label=layout)
            docs.append(run_benchmark(spec, layout_dir, console))
        if simulate is not None:
            predicted.append(simulate(argv, layout_dir / "sim"))
    files = write_plots(docs, out_dir)
    console.rule("comparison")
    console.print(comparison_table(docs))
    if simulate is not None:
        rows = [row for real, sim in zip(docs, predicted) for row in comparison_rows(real, sim)]
        console.print(sim_comparison_table(rows))
    for path in files:
        console.print(f"wrote {path}")
    return docs
