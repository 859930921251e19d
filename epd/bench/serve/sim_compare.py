"""The simulator's prediction next to the measurement: `epd bench sweep --compare-sim PROFILE` and
`epd bench compare REAL SIM`.

    sweep, per layout:  epd serve -> epd bench (every rate) -> stop
                        epd simulate (the same layout, serve options, workload and seed) -> OUT/<layout>/sim/
    then:               one table, a row per (layout, rate): measured | predicted | error

The simulation is `epd simulate` itself (epd.sim.command), given the command line the server got:
the same options size the same caches and batches, and the same workload flags and seed draw the
same requests, so the two differ only in what the simulator leaves out (the HTTP front end and the
model's real kernels, replaced by the profile's cost model).

Errors are relative to the measurement: (predicted - measured) / measured.
"""

from __future__ import annotations

import argparse
import logging
import math
from collections.abc import Sequence
from pathlib import Path

from rich.console import Console
from rich.table import Table

logger = logging.getLogger(__name__)

# (column, summary key, statistic or None, scale to the printed unit)
FIGURES = (
    ("req/s", "request_throughput", None, 1.0),
    ("TTFT p50 s", "ttft", "p50", 1.0),
    ("TTFT p90 s", "ttft", "p90", 1.0),
    ("TPOT p50 ms", "tpot", "p50", 1e3),
    ("TPOT p90 ms", "tpot", "p90", 1e3),
)
# Simulation options that only `epd simulate` has; a sweep runs them at these values.
SIM_DEFAULTS = {"costs": None, "transfer_latency": None, "transfer_bandwidth": None, "control_latency": 0.0}


def figure(summary: dict, key: str, stat: str | None) -> float | None:
    value = summary.get(key)
    return value.get(stat) if stat is not None and isinstance(value, dict) else value


def relative_error(measured: float | None, predicted: float | None) -> float | None:
    if measured is None or predicted is None or measured == 0:
        return None
    return (predicted - measured) / measured


def comparison_rows(real: dict, sim: dict) -> list[dict]:
    """Per rate both documents ran: {"label", "rate", figure name: (measured, predicted, error)}."""
    predicted = {run["rate"]: run["summary"] for run in sim["runs"]}
    rows = []
    for run in real["runs"]:
        if run["rate"] not in predicted:
            continue
        row = {"label": real.get("label") or "", "rate": run["rate"]}
        for name, key, stat, scale in FIGURES:
            m, p = figure(run["summary"], key, stat), figure(predicted[run["rate"]], key, stat)
            m, p = (None if v is None else v * scale for v in (m, p))
            row[name] = (m, p, relative_error(m, p))
        rows.append(row)
    return rows


def comparison_table(rows: Sequence[dict]) -> Table:
    table = Table(title="measured | simulated (error)", title_justify="left")
    table.add_column("layout")
    table.add_column("rate", justify="right")
    for name, *_ in FIGURES:
        table.add_column(name, justify="right")
    for row in rows:
        cells = [_cell(*row[name]) for name, *_ in FIGURES]
        table.add_row(row["label"], _num(row["rate"], "{:g}"), *cells)
    return table


def _cell(measured: float | None, predicted: float | None, error: float | None) -> str:
    err = "" if error is None else f" ({error:+.0%})"
    return f"{_num(measured)} | {_num(predicted)}{err}"


def _num(value: float | None, fmt: str = "{:.3g}") -> str:
    if value is None:
        return "-"
    return "inf" if math.isinf(value) else fmt.format(value)


def simulate_layout(
    bench_args: argparse.Namespace, server_argv: Sequence[str], profile: str, out_dir: Path, console: Console
) -> dict:
    """`epd simulate` of the server `server_argv` would start, on the workload of `bench_args`."""
    from epd.cli import simulated_engine_args
    from epd.sim.command import simulate_spec
    from epd.sim.simulation import run_simulation

    engine_args = simulated_engine_args(_simulate_namespace(bench_args, server_argv, profile))
    args = argparse.Namespace(**(vars(bench_args) | SIM_DEFAULTS | {"profile": profile}))
    args.label = f"sim {engine_args.layout}"
    return run_simulation(simulate_spec(args, engine_args), out_dir, console)


def _simulate_namespace(
    bench_args: argparse.Namespace, server_argv: Sequence[str], profile: str
) -> argparse.Namespace:
    """The server's options as `epd simulate` reads them; those it has no use for are said and
    dropped (server-only ones: port, API key, ...)."""
    from epd.cli import build_parser

    parser = build_parser()
    argv = ["simulate", *server_argv, "--profile", profile]
    args, ignored = parser.parse_known_args(argv)
    if ignored:
        logger.info("not simulated (server-only options): %s", " ".join(ignored))
    args.slo_ttft = bench_args.slo_ttft
    return args
