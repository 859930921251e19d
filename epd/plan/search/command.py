"""The `epd plan` command: its flags (parsed in cli.py) -> a search -> the table, the winner's
`epd serve` command and, with --json, the whole plan.

Every simulation is the one `epd simulate` runs for the same flags with the planned layout, knobs
and devices (epd.plan.search.evaluate); progress goes to stderr, the plan to stdout.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import time
from pathlib import Path

from rich.console import Console

from epd.bench.serve.cli import workload_from_args
from epd.bench.serve.metrics import ATTAINMENT_TARGET
from epd.bench.serve.spec import ArrivalSpec
from epd.entrypoints.options import EngineArgs
from epd.plan.search.evaluate import Evaluator, engine_args_for
from epd.plan.search.knobs import KnobSpace
from epd.plan.search.report import candidate_record, plan_document, plan_table, summary_lines
from epd.plan.search.search import Candidate, Planner, PlanResult, Progress, SearchSettings
from epd.plan.search.serve_command import serve_args, serve_command

WIDE = 180
QUIET_LOGGERS = ("epd.engine", "epd.cluster", "epd.simulate")  # per-simulation chatter


def run_plan_command(args: argparse.Namespace, engine_args: EngineArgs) -> int:
    """Plan, print, save; 0 with a plan, 1 on bad input, 2 when no configuration meets the SLOs."""
    out, progress = Console(), Console(stderr=True)
    if not out.is_terminal:  # a file or a pipe: rich would squeeze the table into 80 columns
        out = Console(width=WIDE)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    started = time.perf_counter()
    try:
        result, evaluator = make_plan(args, engine_args, lambda c: progress.print(progress_line(c)))
    except (ValueError, OSError) as e:  # bad flags, files or profile: the reason, no traceback
        out.print(f"[red]epd plan: {e}[/red]")
        return 1
    doc = plan_document(result, plan_context(args, evaluator), winner_record(result, engine_args))
    doc["search"]["wall_s"] = time.perf_counter() - started
    print_plan(result, doc, out, args)
    if args.json:
        Path(args.json).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        out.print(f"wrote {args.json}")
    return 0 if doc["winner"] is not None else 2


def make_plan(
    args: argparse.Namespace, engine_args: EngineArgs, progress: Progress = lambda c: None
) -> tuple[PlanResult, Evaluator]:
    """Search for the flags in `args` (`epd plan`'s namespace) on top of `engine_args`."""
    evaluator = Evaluator(simulate_namespace(args), engine_args, arrival_of(args), args.max_simulations)
    return Planner(evaluator, search_settings(args), progress).plan(), evaluator


def search_settings(args: argparse.Namespace) -> SearchSettings:
    return SearchSettings(
        gpus=args.gpus,
        rate=args.rate,
        kinds=args.instance_kinds,
        layouts=args.layouts,
        degrees=args.tp,
        space=KnobSpace(args.max_num_seqs_choices, args.max_num_batched_tokens_choices),
        tune_top=args.tune_top,
        knob_trials=args.knob_trials,
        scheduling_policy=args.scheduling_policy,
        policies=args.scheduling_policy_choices if has_ttft_slo(args) else (),
        policy_top=args.policy_top,
        policy_trials=args.policy_trials,
        rate_steps=args.rate_steps,
        seed=args.seed,
    )


def has_ttft_slo(args: argparse.Namespace) -> bool:
    """Some request has a TTFT deadline (--slo-ttft, or a --classes class's): queue order serves
    deadlines, so without one the policies have nothing to order by and are not searched."""
    return args.slo_ttft is not None or any(c.slo.ttft is not None for c in args.classes)


def simulate_namespace(args: argparse.Namespace) -> argparse.Namespace:
    """`epd simulate`'s namespace for these flags: one run, whose rate each simulation sets."""
    return argparse.Namespace(**{**vars(args), "rates": None, "rate": math.inf, "label": None})


def arrival_of(args: argparse.Namespace) -> ArrivalSpec:
    return ArrivalSpec(math.inf, args.arrival, args.burstiness, args.max_concurrency)


def progress_line(c: Candidate) -> str:
    if c.goodput is not None:
        outcome = f"goodput {c.goodput:.3f} req/s"
    elif c.search is not None and c.search.below is not None:
        outcome = f"below {c.search.below:.3g} req/s"
    else:
        outcome = "out of simulations"
    return f"  {c.config.describe()}: {outcome} ({c.simulations} simulations)"


def winner_record(result: PlanResult, engine_args: EngineArgs) -> dict | None:
    winner = result.winner
    if winner is None:
        return None
    planned = engine_args_for(engine_args, winner.config)
    options = {f.name: getattr(planned, f.name) for f in dataclasses.fields(planned) if f.name != "limits"}
    return candidate_record(winner, result.settings.scheduling_policy) | {
        "engine_args": options,
        "serve_args": serve_args(planned),
        "serve_command": serve_command(planned),
    }


def plan_context(args: argparse.Namespace, evaluator: Evaluator) -> dict:
    """What the plan was made for: SLOs, workload, arrivals, costs."""
    return {
        "slo": {"ttft": args.slo_ttft, "tpot": args.slo_tpot, "attainment_target": ATTAINMENT_TARGET},
        "workload": dataclasses.asdict(workload_from_args(args)),
        "arrival": dataclasses.asdict(arrival_of(args)) | {"rate": None},
        "num_requests": args.num_requests,
        "costs": evaluator.costs_record(),
    }


def print_plan(result: PlanResult, doc: dict, console: Console, args: argparse.Namespace) -> None:
    console.print(plan_table(result, args.top))
    for line in summary_lines(result, args.num_requests, args.slo_ttft):
        console.print(line)
    winner = doc["winner"]
    if winner is None:
        console.print("[red]no configuration met the SLOs[/red]")
        return
    policy = winner["engine_args"]["scheduling_policy"]
    console.print(
        f"best: {winner['layout']}, scheduling policy {policy}, {winner['goodput']:.3f} req/s goodput; "
        "serve it with:"
    )
    console.print(winner["serve_command"], soft_wrap=True, highlight=False, markup=False)
