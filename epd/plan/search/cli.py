"""`epd plan`: the layout and engine limits that serve a workload best, found on the simulator.

    epd plan --model DIR --profile profile.json --gpus 4 --slo-ttft 1 --slo-tpot 0.05 \\
        --image-size 896x896 --output-tokens 256 --dtype bfloat16 --kv-cache-memory-bytes 40GiB
    epd plan ... --gpus 8 --rate 6          # the fewest GPUs that serve 6 req/s within the SLOs

Only argparse is imported here: the search and the simulator load inside the command. The engine
option flags are `epd simulate`'s (epd/cli.py), less the ones the plan decides.
"""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from epd.cluster.layout import Layout
    from epd.entrypoints.options import EngineArgs

# `epd simulate` options the plan decides itself: the layout, its devices and the searched knobs.
DECIDED_OPTIONS = ("layout", "device", "devices", "max_num_seqs", "max_num_batched_tokens")


def add_plan_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    from epd.bench.serve.cli import add_workload_options
    from epd.cli import add_engine_option_flags

    p = sub.add_parser(
        "plan",
        help="find the layout and batch limits with the highest goodput (or the fewest GPUs) by simulation",
        description="Search every layout of the GPUs given (one GPU per instance, groups of E, P, D, "
        "EP, PD and EPD instances; with --tp, also tensor-parallel P and D ones) and the engines' "
        "batch limits for the highest goodput: the largest request rate served with >= 90% of "
        "requests within the TTFT and TPOT SLOs, each configuration simulated by `epd simulate` on "
        "`epd bench`'s workload. With --rate, the fewest GPUs that serve that rate. Prints a ranked "
        "table and the `epd serve` command of the best configuration (exit status 2 when no "
        "configuration meets the SLOs).",
        formatter_class=formatter,
    )
    add_engine_option_flags(p, plan_option_names())
    _search_options(p)
    _cost_options(p)
    add_workload_options(p)
    _arrival_options(p)
    _output_options(p)
    p.set_defaults(func=run_plan, parser=p)


def _search_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "search",
        "Each configuration's goodput comes from a few simulations at rates it picks (bracket, then "
        "bisect); --seed also orders the knob trials, so the same flags give the same plan. "
        "--warmup requests are not simulated.",
    )
    g.add_argument("--gpus", type=int, required=True, help="GPUs to plan for (with --rate: at most)")
    g.add_argument("--slo-ttft", type=float, default=None, help="TTFT objective, seconds")
    g.add_argument("--slo-tpot", type=float, default=None, help="TPOT objective, seconds")
    g.add_argument(
        "--instance-kinds",
        type=_kinds,
        default="E,EP,EPD,P,PD,D",
        help="role sets an instance may hold (e.g. E,P,D: only fully disaggregated layouts)",
    )
    g.add_argument(
        "--layouts",
        type=_layouts,
        default=(),
        metavar="L,...",
        help="consider only these layouts (e.g. 4EPD,2EP+2D,1E+1P@tp2+1D; one GPU per instance, N per "
        "@tpN one); default: every valid layout of --instance-kinds and --tp",
    )
    g.add_argument(
        "--tp",
        type=_ints,
        default="1",
        metavar="N,...",
        help="tensor-parallel degrees P and D instances may run at (e.g. 1,2: also @tp2 groups, each "
        "instance taking 2 of the --gpus); the --profile must hold them (epd profile --tp 1,2)",
    )
    g.add_argument(
        "--max-num-seqs-choices",
        type=_ints,
        default="32,64,128,256,512",
        help="values of epd serve's --max-num-seqs to try (one value: fixed)",
    )
    g.add_argument(
        "--max-num-batched-tokens-choices",
        type=_ints,
        default="512,1024,2048,4096,8192,16384",
        help="values of epd serve's --max-num-batched-tokens to try, on layouts with PD or EPD "
        "instances (the others prefill whole prompts); one value: fixed",
    )
    g.add_argument("--tune-top", type=int, default=3, help="layouts whose knobs are tuned, the best first")
    g.add_argument("--knob-trials", type=int, default=4, help="knob settings tried per tuned layout")
    g.add_argument(
        "--scheduling-policy-choices",
        type=_policies,
        default="fcfs,slo",
        metavar="P,...",
        help="queue policies each stage (encode, prefill, decode) may take in the plan's "
        "--scheduling-policy, tried only where requests have a TTFT SLO (--slo-ttft, --classes); "
        "one value: fixed",
    )
    g.add_argument(
        "--policy-top", type=int, default=2, help="layouts whose queue policies are tried, the best first"
    )
    g.add_argument("--policy-trials", type=int, default=2, help="queue policy settings tried per such layout")
    g.add_argument(
        "--rate-steps", type=int, default=3, help="bisections of each rate search (more: a finer goodput)"
    )
    g.add_argument(
        "--max-simulations",
        type=int,
        default=400,
        help="simulations at most, all configurations together (each serves --num-requests requests)",
    )


def _cost_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "costs",
        "As `epd simulate`: the instances are simulated on cuda:0, cuda:1, ... (CUDA IPC between them "
        "unless --transfer says otherwise), priced by --profile.",
    )
    g.add_argument("--profile", default=None, help="fitted costs of compute and links (epd profile's JSON)")
    g.add_argument(
        "--costs",
        default=None,
        metavar="NAME=S,...",
        help="without --profile, the linear costs in seconds: step_s, token_s, sequence_s, encode_s, "
        "patch_s (see epd simulate --help); those not given keep their defaults",
    )
    g.add_argument(
        "--transfer-latency", type=float, default=None, help="seconds per transfer (default: the profile's)"
    )
    g.add_argument(
        "--transfer-bandwidth",
        type=float,
        default=None,
        help="bytes per second between two instances (default: the profile's)",
    )
    g.add_argument(
        "--control-latency", type=float, default=0.0, help="seconds per router <-> instance message"
    )


def _arrival_options(p: argparse.ArgumentParser) -> None:
    from epd.bench.serve.spec import ARRIVALS

    g = p.add_argument_group("arrivals", "The plan picks the rates; these shape the arrivals at each.")
    g.add_argument(
        "--rate",
        type=float,
        default=None,
        help="requests per second to serve: plan the fewest GPUs (up to --gpus) that meet the SLOs at it",
    )
    g.add_argument("--arrival", default="poisson", choices=ARRIVALS, help="gaps between requests")
    g.add_argument(
        "--burstiness", type=float, default=1.0, help="gamma: coefficient of variation of the gaps"
    )
    g.add_argument("--max-concurrency", type=int, default=None, help="requests in flight at most")


def _output_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("output")
    g.add_argument("--json", default=None, metavar="FILE", help="write the whole plan as JSON")
    g.add_argument("--top", type=int, default=10, help="rows of the ranked table")


def _ints(text: str) -> tuple[int, ...]:
    try:
        values = tuple(sorted({int(v) for v in text.split(",") if v.strip()}))
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a comma list of integers: {text!r}") from None
    if not values or values[0] < 1:
        raise argparse.ArgumentTypeError(f"need integers >= 1: {text!r}")
    return values


def _layouts(text: str) -> tuple[Layout, ...]:
    from epd.cluster.layout import Layout

    try:
        return tuple(Layout.parse(part) for part in text.split(",") if part.strip())
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def _policies(text: str) -> tuple[str, ...]:
    from epd.engine.queue_policy import POLICIES

    names = tuple(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    unknown = [name for name in names if name not in POLICIES]
    if not names or unknown:
        raise argparse.ArgumentTypeError(f"not a comma list of {', '.join(POLICIES)}: {text!r}")
    return names


def _kinds(text: str) -> tuple[str, ...]:
    from epd.plan.search.layouts import parse_kinds

    try:
        return parse_kinds(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def run_plan(args: argparse.Namespace) -> int:
    from epd.bench.serve.cli import check_workload_args

    check_workload_args(args)
    _check_plan_args(args)
    from epd.plan.search.command import run_plan_command

    return run_plan_command(args, plan_engine_args(args))


def _check_plan_args(args: argparse.Namespace) -> None:
    if args.gpus < 1:
        args.parser.error("--gpus must be >= 1")
    if args.slo_ttft is None and args.slo_tpot is None:
        args.parser.error("give --slo-ttft and/or --slo-tpot: goodput is the rate served within them")
    counts = {layout.num_devices for layout in args.layouts}
    if counts and (max(counts) > args.gpus or args.rate is None and counts != {args.gpus}):
        args.parser.error(f"--layouts must use --gpus GPUs ({args.gpus}; with --rate: at most)")
    if args.rate is not None and not 0 < args.rate < float("inf"):
        args.parser.error("--rate must be a finite rate > 0")
    if min(args.tune_top, args.knob_trials, args.rate_steps, args.policy_top, args.policy_trials) < 0:
        args.parser.error(
            "--tune-top, --knob-trials, --rate-steps, --policy-top and --policy-trials must be >= 0"
        )
    if args.max_simulations < 1:
        args.parser.error("--max-simulations must be >= 1")


def plan_engine_args(args: argparse.Namespace) -> EngineArgs:
    """The `epd serve` options the plan's flags fix; the plan sets the layout, devices and knobs."""
    from epd.cli import default_model, engine_option_value
    from epd.entrypoints.options import EngineArgs, engine_options

    model = args.model or default_model()
    if model is None:
        args.parser.error("--model is required (the built-in demo model is missing from this install)")
    names = plan_option_names()
    options = {f.name: engine_option_value(args, f) for f in engine_options() if f.name in names}
    # As `epd simulate`: the TTFT objective is the deadline `--scheduling-policy slo` serves by.
    options["slo_ttft"] = args.slo_ttft
    return EngineArgs(model, **options)


def plan_option_names() -> list[str]:
    """The engine options `epd plan` takes: those that shape a simulation, less the decided ones."""
    from epd.cli import SIMULATED_OPTIONS

    return [name for name in SIMULATED_OPTIONS if name not in DECIDED_OPTIONS]
