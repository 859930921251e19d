"""`epd bench`, `epd bench sweep` and `epd bench plot`: flags in the style of `vllm bench serve`.

    epd bench --base-url http://127.0.0.1:8000 --workload synthetic --image-size 1344x1344 \\
        --rates 0.5,1,2,4 --num-requests 200 --slo-ttft 2 --slo-tpot 0.1
    epd bench sweep --model DIR --layouts "1EPD,1E+1P+1D" --devices cuda:0,cuda:1,cuda:2 --rates 1,2,4
    epd bench plot a/results.json b/results.json --out compare/
    epd bench --phases phases.yaml ...   # phases back to back, each its own mix (epd.bench.serve.phases)

Only argparse is imported here: the benchmark's own imports happen inside the commands.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import shlex
import time
from pathlib import Path
from typing import TYPE_CHECKING

from epd.bench.serve.spec import (
    ARRIVALS,
    DEFAULT_OUTPUT_TOKENS,
    SLO,
    WORKLOADS,
    ArrivalSpec,
    BenchSpec,
    WorkloadSpec,
    parse_int_range,
    parse_rates,
    parse_sizes,
    share,
)

if TYPE_CHECKING:
    from rich.console import Console

API_KEY_ENVS = ("EPD_API_KEY", "OPENAI_API_KEY")
DEFAULT_BASE_URL = "http://127.0.0.1:8000"


def add_bench_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "bench",
        help="benchmark an OpenAI-compatible server (epd bench sweep: several epd layouts)",
        description="Drive a running OpenAI-compatible server with a multimodal workload at given "
        "arrival rates; report TTFT/TPOT/ITL/E2E percentiles, throughput, SLO attainment, goodput "
        "and epd's per-stage breakdown, as a table, results.json and PNG plots.",
        formatter_class=formatter,
    )
    g = p.add_argument_group("server")
    g.add_argument("--base-url", default=DEFAULT_BASE_URL, help="the server (with or without /v1)")
    g.add_argument("--model", default=None, help="model name to request (default: the first of /v1/models)")
    g.add_argument("--api-key", default=None, help=f"bearer token (default: ${' or $'.join(API_KEY_ENVS)})")
    _common_options(p)
    p.set_defaults(func=run_bench_command, parser=p)
    bench_sub = p.add_subparsers(dest="bench_command", metavar="{sweep,plot,compare}")
    _add_sweep_parser(bench_sub, formatter)
    _add_plot_parser(bench_sub, formatter)
    _add_compare_parser(bench_sub, formatter)


def _add_sweep_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "sweep",
        help="start epd serve per layout, run the same benchmark on each, compare",
        description="For each layout: start `epd serve` on the same devices, run the benchmark "
        "(every rate), stop it. Results per layout in OUT/<layout>/, comparison plots in OUT/.",
        formatter_class=formatter,
    )
    g = p.add_argument_group("servers")
    g.add_argument("--model", required=True, help="model directory every server loads")
    g.add_argument("--layouts", required=True, help='comma list of layouts, e.g. "4EPD,2EP+2D,1E+1P+2D"')
    g.add_argument("--devices", default="cpu", help="device(s) of every server (cpu, cuda:0,cuda:1,...)")
    g.add_argument("--serve-args", default="", help='more `epd serve` options, e.g. "--dtype bfloat16"')
    g.add_argument("--server-start-timeout", type=float, default=600.0, help="seconds to wait for /health")
    g.add_argument(
        "--compare-sim",
        default=None,
        metavar="PROFILE",
        help="also run `epd simulate` of each layout with this profile (epd profile's JSON) and print "
        "measured vs predicted TTFT, TPOT and throughput per rate; simulated results in OUT/<layout>/sim/",
    )
    _common_options(p)
    p.set_defaults(func=run_sweep_command, parser=p)


def _add_compare_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "compare",
        help="measured vs simulated: a results file next to `epd simulate`'s",
        description="Per rate both ran: throughput, TTFT p50/p90 and TPOT p50/p90 measured, predicted "
        "and the relative error (predicted - measured) / measured.",
        formatter_class=formatter,
    )
    p.add_argument("real", help="epd bench's results.json (or its folder)")
    p.add_argument("simulated", help="epd simulate's results.json (or its folder)")
    p.set_defaults(func=run_compare_command, parser=p)


def _add_plot_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "plot",
        help="plot several results files on the same axes",
        description="Comparison plots (attainment vs rate, TTFT CDF, stage breakdown) of results files; "
        "with a --classes workload also a table per class, each file's goodput against the first's "
        "(its attainment at the first's goodput rate) and both as OUT/classes.md.",
        formatter_class=formatter,
    )
    p.add_argument("results", nargs="+", help="results.json files (or the folders holding them)")
    p.add_argument("--labels", default=None, help="comma list, one per file (default: each file's label)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: timestamped)")
    p.set_defaults(func=run_plot_command, parser=p)


def _common_options(p: argparse.ArgumentParser) -> None:
    add_workload_options(p)
    add_arrival_options(p)
    g = add_slo_options(p)
    g.add_argument(
        "--epd-timings",
        default="auto",
        choices=["auto", "on", "off"],
        help="ask for the per-stage breakdown (auto: when /v1/models says owned_by epd)",
    )
    g.add_argument("--request-timeout", type=float, default=600.0, help="seconds without data per request")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument_group("phases").add_argument(
        "--phases",
        default=None,
        metavar="FILE|JSON",
        help="a phased workload: a .json/.yaml file or inline JSON listing phases, each with its own "
        "image_size, output_tokens, rate, ... and num_requests or duration (seconds); keys left out "
        "come from the flags; reported per phase (see epd/bench/serve/phases.py)",
    )


def add_slo_options(p: argparse.ArgumentParser, out_prefix: str = "bench") -> argparse._ArgumentGroup:
    """--slo-ttft, --slo-tpot, --out, --label (shared with `epd simulate`); the group, for more."""
    g = p.add_argument_group("SLOs and output")
    g.add_argument("--slo-ttft", type=float, default=None, help="TTFT objective, seconds")
    g.add_argument("--slo-tpot", type=float, default=None, help="TPOT objective, seconds")
    g.add_argument("--out", default=None, help=f"output folder (default: ./{out_prefix}-YYYYmmdd-HHMMSS)")
    g.add_argument("--label", default=None, help="name of this run on comparison plots")
    return g


def add_workload_options(p: argparse.ArgumentParser) -> None:
    """The workload flags (shared with `epd simulate`, which must draw the same requests)."""
    g = p.add_argument_group("workload")
    g.add_argument("--workload", default="synthetic", choices=WORKLOADS, help="what to send")
    g.add_argument(
        "--images-per-request",
        type=parse_int_range,
        default="1",
        metavar="N|A-B",
        help="images per request, fixed or drawn uniformly from A-B",
    )
    g.add_argument(
        "--image-size",
        type=parse_sizes,
        default="512x512",
        metavar="WxH[:P],...",
        help="image sizes: one, a list (equally likely) or with probabilities",
    )
    g.add_argument("--image-reuse", type=share, default=0.0, help="share of images repeating an earlier one")
    g.add_argument(
        "--classes",
        type=_classes,
        default=(),
        metavar="FILE|JSON",
        help="a mix of request classes (synthetic): a JSON list (inline or a .json file) of {name, share, "
        "images_per_request, image_size, output_tokens, slo_ttft, slo_tpot}; each request is of one, "
        "carries its SLO to the server and is judged by it (see epd/bench/serve/classes.py)",
    )
    g.add_argument("--prompt-tokens", type=int, default=64, help="text tokens per prompt (synthetic)")
    g.add_argument(
        "--output-tokens",
        type=int,
        default=None,
        help="max_tokens (default: synthetic "
        f"{DEFAULT_OUTPUT_TOKENS['synthetic']}, shapes {DEFAULT_OUTPUT_TOKENS['shapes']}, "
        "jsonl: each line's)",
    )
    g.add_argument("--no-ignore-eos", action="store_true", help="synthetic: let requests stop at EOS")
    g.add_argument("--text-only-share", type=share, default=0.0, help="share of requests without images")
    g.add_argument("--temperature", type=float, default=0.0, help="sampling temperature (synthetic)")
    g.add_argument("--dataset-path", default=None, help="JSONL file of chat requests (--workload jsonl)")
    g.add_argument(
        "--tokenizer",
        default=None,
        help="directory with tokenizer.json, for exact prompt "
        "lengths (default: the model's directory when local)",
    )
    g.add_argument("--num-requests", type=int, default=100, help="measured requests per rate")
    g.add_argument("--warmup", type=int, default=2, help="unrecorded requests sent first, one at a time")
    g.add_argument("--seed", type=int, default=0, help="seed of the workload and the arrival times")


def add_arrival_options(p: argparse.ArgumentParser) -> None:
    """The arrival flags (shared with `epd simulate`)."""
    g = p.add_argument_group("arrivals")
    rates = g.add_mutually_exclusive_group()
    rates.add_argument("--rate", type=float, default=math.inf, help="requests per second (inf: all at once)")
    rates.add_argument("--rates", type=parse_rates, default=None, help="a sweep, e.g. 0.5,1,2,4: one curve")
    g.add_argument("--arrival", default="poisson", choices=ARRIVALS, help="gaps between requests")
    g.add_argument(
        "--burstiness",
        type=float,
        default=1.0,
        help="gamma: coefficient of variation of the gaps (1: Poisson; vLLM's --burstiness is 1/CV^2)",
    )
    g.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="requests in flight at most (with the default infinite rate: a closed loop)",
    )
    g.add_argument(
        "--same-arrivals",
        action="store_true",
        help="every run sends one pattern of gaps (drawn from --seed), scaled so that it averages "
        "exactly the run's rate: runs differ only in rate (by default each draws its own, and a "
        "short bursty run offers a rate off by about CV/sqrt(N))",
    )


def spec_from_args(args: argparse.Namespace, base_url: str, model: str | None) -> BenchSpec:
    """ValueError if --phases is wrong (epd.bench.serve.phases.load_phases says how)."""
    return BenchSpec(
        base_url=base_url,
        model=model,
        api_key=getattr(args, "api_key", None) or next(filter(None, map(os.environ.get, API_KEY_ENVS)), None),
        workload=workload_from_args(args),
        arrivals=arrivals_from_args(args),
        slo=SLO(args.slo_ttft, args.slo_tpot),
        num_requests=args.num_requests,
        warmup=args.warmup,
        seed=args.seed,
        epd_timings=args.epd_timings,
        request_timeout=args.request_timeout,
        progress=not args.no_progress,
        label=args.label,
        phases=phases_from_args(args),
    )


def phases_from_args(args: argparse.Namespace) -> tuple:
    if getattr(args, "phases", None) is None:
        return ()
    from epd.bench.serve.phases import load_phases

    return load_phases(args.phases, workload_from_args(args), arrival_of(args), args.num_requests)


def workload_from_args(args: argparse.Namespace) -> WorkloadSpec:
    kind = args.workload
    output = args.output_tokens if args.output_tokens is not None else DEFAULT_OUTPUT_TOKENS[kind]
    return WorkloadSpec(
        kind=kind,
        images_per_request=args.images_per_request,
        image_sizes=args.image_size,
        image_reuse=args.image_reuse,
        prompt_tokens=args.prompt_tokens,
        output_tokens=output,
        text_only_share=args.text_only_share,
        dataset_path=args.dataset_path,
        temperature=args.temperature,
        ignore_eos=not args.no_ignore_eos,
        tokenizer=args.tokenizer,
        classes=getattr(args, "classes", ()),
    )


def arrivals_from_args(args: argparse.Namespace) -> tuple[ArrivalSpec, ...]:
    """One arrival spec per rate: the runs of a sweep."""
    rates = args.rates or (args.rate,)
    return tuple(dataclasses.replace(arrival_of(args), rate=r) for r in rates)


def arrival_of(args: argparse.Namespace) -> ArrivalSpec:
    """The arrival flags at --rate (namespaces of commands without --same-arrivals: off)."""
    pattern_seed = args.seed if getattr(args, "same_arrivals", False) else None
    return ArrivalSpec(args.rate, args.arrival, args.burstiness, args.max_concurrency, pattern_seed)


def out_dir_of(args: argparse.Namespace, prefix: str = "bench") -> Path:
    return Path(args.out) if args.out else Path.cwd() / time.strftime(f"{prefix}-%Y%m%d-%H%M%S")


def check_workload_args(args: argparse.Namespace) -> None:
    """Usage errors of the workload and arrival flags (exits through the parser)."""
    if args.num_requests < 1 or args.warmup < 0:
        args.parser.error("--num-requests must be >= 1 and --warmup >= 0")
    if args.max_concurrency is not None and args.max_concurrency < 1:
        args.parser.error("--max-concurrency must be >= 1")
    if getattr(args, "classes", ()) and args.workload != "synthetic":
        args.parser.error("--classes mixes synthetic requests: use it with --workload synthetic")
    if args.workload == "jsonl" and not args.dataset_path:
        args.parser.error("--workload jsonl needs --dataset-path FILE")
    if args.arrival == "gamma" and args.burstiness <= 0:
        args.parser.error("--burstiness must be > 0")
    if getattr(args, "phases", None) is not None and args.rates:
        args.parser.error("--phases runs its phases' own rates: give --rate (a default), not --rates")


def _quiet_http_logs() -> None:
    # httpx logs every request at INFO: thousands of lines that would bury the progress bar.
    import logging

    logging.getLogger("httpx").setLevel(logging.WARNING)


def run_bench_command(args: argparse.Namespace) -> int:
    check_workload_args(args)
    _quiet_http_logs()
    from rich.console import Console

    from epd.bench.serve.bench import BenchError, run_benchmark

    console = Console(stderr=False)
    try:
        run_benchmark(spec_from_args(args, args.base_url, args.model), out_dir_of(args), console)
    except (BenchError, ValueError, OSError) as e:  # bad workload files or values: no traceback
        console.print(f"[red]epd bench: {e}[/red]")
        return 1
    return 0


def run_sweep_command(args: argparse.Namespace) -> int:
    check_workload_args(args)
    _quiet_http_logs()
    from rich.console import Console

    from epd.bench.serve.bench import BenchError
    from epd.bench.serve.launcher import ServerFailed
    from epd.bench.serve.sweep import SweepSpec, run_sweep

    layouts = tuple(lay.strip() for lay in args.layouts.split(",") if lay.strip())
    sweep = SweepSpec(
        args.model, layouts, args.devices, tuple(shlex.split(args.serve_args)), args.server_start_timeout
    )
    console = Console()
    out_dir = out_dir_of(args)
    simulate = None
    if args.compare_sim is not None:
        from epd.bench.serve.sim_compare import simulate_layout

        def simulate(argv: list[str], sim_dir: Path) -> dict:
            return simulate_layout(args, argv, args.compare_sim, sim_dir, console)

    try:
        run_sweep(sweep, spec_from_args(args, "", None), out_dir, console, simulate)
    except (BenchError, ServerFailed, ValueError, OSError) as e:
        console.print(f"[red]epd bench sweep: {e}[/red]")
        return 1
    return 0


def run_plot_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from epd.bench.serve.plots import write_plots
    from epd.bench.serve.report import comparison_table
    from epd.bench.serve.results import load

    docs = [load(path) for path in args.results]
    labels = args.labels.split(",") if args.labels else []
    if labels and len(labels) != len(docs):
        args.parser.error(f"{len(labels)} labels for {len(docs)} files")
    for doc, label in zip(docs, labels):
        doc["label"] = label
    out = out_dir_of(args)
    out.mkdir(parents=True, exist_ok=True)
    console = Console()
    console.print(comparison_table(docs))
    files = write_plots(docs, out)
    files += _print_classes(docs, out, console)
    for path in files:
        console.print(f"wrote {path}")
    return 0


def _print_classes(docs: list[dict], out: Path, console: Console) -> list[Path]:
    """Files of a --classes workload: the per-class table and goodput lines, also as classes.md."""
    from epd.bench.serve.class_report import class_table, goodput_lines, has_classes, markdown

    if not has_classes(docs):
        return []
    console.print(class_table(docs))
    lines = goodput_lines(docs)
    for line in lines:
        console.print(line, highlight=False)
    path = out / "classes.md"
    path.write_text(markdown(docs) + "\n" + "".join(f"- {line}\n" for line in lines), encoding="utf-8")
    return [path]


def run_compare_command(args: argparse.Namespace) -> int:
    from rich.console import Console

    from epd.bench.serve.results import load
    from epd.bench.serve.sim_compare import comparison_rows, comparison_table

    try:
        rows = comparison_rows(load(args.real), load(args.simulated))
    except (OSError, ValueError, KeyError) as e:
        print(f"epd bench compare: cannot read the results: {e}")
        return 1
    if not rows:
        print("epd bench compare: the two files share no rate")
        return 1
    Console().print(comparison_table(rows))
    return 0


def _classes(text: str) -> tuple:
    from epd.bench.serve.classes import parse_classes

    try:
        return parse_classes(text)
    except (ValueError, OSError) as err:
        raise argparse.ArgumentTypeError(str(err)) from None
