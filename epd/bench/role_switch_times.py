"""How long a role switch takes, by phase (drain, reconfigure, weights, memory, rejoin, total), for
P -> D, D -> P, P -> E and E -> P on a real cluster.

    python -m epd.bench.model_dir --out /tmp/qwen2_5_vl_7b --config-dir .cfg        # the 7B shape
    python -m epd.bench.role_switch_times --model /tmp/qwen2_5_vl_7b --devices cuda:0,cuda:1,cuda:0 \\
        --load-format dummy --dtype bfloat16 --out switch_times.json
    python -m epd.bench.role_switch_times --model TINY_DIR --device cpu --out /tmp/st.json   # checks it

Layout 1E+1P+1PD with --switchable-roles: P0 (alone on the second GPU) goes round
P -> D -> P -> E -> P, `--repeats` times, while E0 and PD0 (sharing the first GPU) keep every
role served (a switching instance leaves placement; an encoder that leaves needs another encoder).
Before each switch `--requests` requests run to completion, so the caches hold something to free;
after each round one more request checks that the cluster still answers. Each switch's record
comes from `LLM.set_roles` (epd.cluster.router.role_switch: the phases' table); the table prints
the mean and the largest of each phase per transition, and --out gets every record.

It says where it is as it goes, so that a run cut short still leaves figures: the start-up (each
instance logs its host copy of the weights and its engine), each switch's phases the moment it is
made, and --out rewritten after every switch ("complete": false until the last).

Where the time goes on GPUs (the 7B shape, dummy bf16): the switches themselves take seconds; the
start takes most of a run, since every instance (switchable roles is cluster-wide) draws the whole
model on its GPU, copies it into 16.6 GB of page-locked host memory and captures its CUDA graphs.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

from epd import LLM, SamplingParams
from epd.cluster.router.role_switch import PHASES

LAYOUT = "1E+1P+1PD"
SWITCHING = "P0"
ROUND = ("D", "P", "E", "P")  # from P: P -> D, D -> P, P -> E, E -> P
OUTPUT_TOKENS = 16


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="model directory (python -m epd.bench.model_dir)")
    p.add_argument("--device", default="cpu", help="every instance's device (cpu for the check)")
    p.add_argument("--devices", default=None, help="one per instance of 1E+1P+1PD, e.g. cuda:0,cuda:1,cuda:0")
    p.add_argument("--load-format", default="safetensors", choices=("safetensors", "dummy"))
    p.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    p.add_argument("--repeats", type=int, default=2, help="rounds of P -> D -> P -> E -> P")
    p.add_argument("--requests", type=int, default=2, help="requests served before each switch")
    p.add_argument("--kv-cache-memory-bytes", type=int, default=1 << 30, help="per instance")
    p.add_argument("--out", type=Path, required=True, help="JSON: every switch's record and the summary")
    args = p.parse_args(argv)
    if args.repeats < 1 or args.requests < 0:
        p.error("--repeats must be >= 1 and --requests >= 0")
    return args


class Report:
    """The switches made so far, printed and written to --out as each one is made."""

    def __init__(self, args: argparse.Namespace) -> None:
        self.out = args.out
        self.setup = {k: v for k, v in vars(args).items() if k != "out"}
        self.setup |= {"layout": LAYOUT, "switching": SWITCHING}
        self.started = time.perf_counter()
        self.startup_s: float | None = None
        self.records: list[dict] = []

    def say(self, line: str) -> None:
        print(f"[{time.perf_counter() - self.started:7.1f} s] {line}", flush=True)

    def cluster_up(self) -> None:
        self.startup_s = time.perf_counter() - self.started
        self.say(f"{LAYOUT} up in {self.startup_s:.1f} s")
        self.write(complete=False)

    def add(self, record: dict) -> None:
        self.records.append(record)
        self.say(describe(record))
        self.write(complete=False)

    def write(self, complete: bool) -> None:
        document = {
            "setup": self.setup,
            "startup_s": self.startup_s,
            "complete": complete,
            "summary": summarize(self.records),
            "switches": self.records,
        }
        self.out.write_text(json.dumps(document, indent=2, default=str))


def run(args: argparse.Namespace, report: Report) -> list[dict]:
    """Every switch's record (LLM.set_roles), in order, each also given to `report` as it is made;
    RuntimeError if one failed (after its record)."""
    options = {
        "layout": LAYOUT,
        "device": args.device,
        "devices": args.devices,
        "load_format": args.load_format,
        "dtype": args.dtype,
        "switchable_roles": True,
        "kv_cache_memory_bytes": args.kv_cache_memory_bytes,
    }
    report.say(
        f"starting {LAYOUT} on {args.devices or args.device} ({args.load_format} {args.dtype} weights)"
    )
    with LLM(args.model, **options) as llm:
        report.cluster_up()
        serve(llm, 1)  # warm-up: every instance has run a step
        report.say("warm-up request served")
        for _ in range(args.repeats):
            for roles in ROUND:
                serve(llm, args.requests)
                record = llm.set_roles(SWITCHING, roles)
                report.add(record)
                if record["error"]:
                    raise RuntimeError(f"{SWITCHING} {record['from']} -> {record['to']}: {record['error']}")
            serve(llm, 1)  # still answers
    return report.records


def serve(llm: LLM, count: int) -> None:
    if count == 0:
        return
    prompts = [f"Count from {i} to {i + 40}:" for i in range(count)]
    params = SamplingParams(temperature=0, max_tokens=OUTPUT_TOKENS, ignore_eos=True)
    outputs = llm.generate(prompts, params, use_tqdm=False)
    if any(len(out.outputs[0].token_ids) != OUTPUT_TOKENS for out in outputs):
        raise RuntimeError(f"a request did not get its {OUTPUT_TOKENS} tokens")


def describe(record: dict) -> str:
    """One switch on one line: its phases in milliseconds."""
    move = f"{record['id']} {record['from']} -> {record['to']}"
    if record["error"]:
        return f"{move} FAILED: {record['error']}"
    timings = record["timings"]
    phases = ", ".join(f"{p} {timings[p] * 1e3:.1f}" for p in PHASES if timings[p] is not None)
    return f"{move}: {phases} ms"


def summarize(records: list[dict]) -> dict[str, dict[str, dict[str, float]]]:
    """Per transition ("P->D"), per phase: mean and max seconds over its switches that were made."""
    by_move: dict[str, list[dict]] = {}
    for record in records:
        if not record["error"]:
            by_move.setdefault(f"{record['from']}->{record['to']}", []).append(record["timings"])
    return {
        move: {
            phase: {
                "mean": statistics.fmean(t[phase] for t in timings),
                "max": max(t[phase] for t in timings),
            }
            for phase in PHASES
        }
        for move, timings in by_move.items()
    }


def table(summary: dict[str, dict[str, dict[str, float]]]) -> str:
    header = f"{'switch':<8}" + "".join(f"{phase:>20}" for phase in PHASES)
    lines = [header, "-" * len(header)]
    for move, phases in summary.items():
        cells = "".join(f"{phases[p]['mean'] * 1e3:>11.1f} ({phases[p]['max'] * 1e3:>5.0f})" for p in PHASES)
        lines.append(f"{move:<8}{cells}")
    lines.append("milliseconds: mean (max) per phase; weights and memory are parts of reconfigure")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    report = Report(args)
    records = run(args, report)
    report.write(complete=True)
    print(table(summarize(records)))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
