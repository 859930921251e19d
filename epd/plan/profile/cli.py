"""`epd profile`: measure what each stage costs on a device, fit a model per stage, save it.

    epd profile --model DIR --device cuda:0 --load-format dummy --dtype bfloat16 --out profile.json
    python -m epd.plan.profile --quick --out profile.json      # the built-in demo model, here
    epd profile --model DIR --tp 1,2,4 ...   # also prefill and decode of @tp2 and @tp4 instances

Only argparse is imported here: torch and the model code load inside the command, so --help is
instant.
"""

from __future__ import annotations

import argparse

STAGE_NAMES = ("encode", "prefill", "decode", "transfer", "front_end", "patches")
GRID_OPTIONS = {  # option -> (Grids field, element type, what it sets)
    "--decode-batches": ("decode_batches", int, "sequences per decode step"),
    "--decode-contexts": ("decode_contexts", int, "context tokens of each decoding sequence"),
    "--prefill-seqs": ("prefill_seqs", int, "sequences per prefill step"),
    "--prefill-tokens": ("prefill_tokens", int, "new tokens of each prefilling sequence"),
    "--prefill-contexts": ("prefill_contexts", int, "cached tokens before each prefill's new ones"),
    "--mixed-decodes": ("mixed_decodes", int, "decodes sharing a step with one prefill"),
    "--encode-images": ("encode_images", int, "images per vision batch"),
    "--encode-sides": ("encode_sides", int, "image side in pixels (square images, multiples of 28)"),
    "--transfer-mb": ("transfer_mb", float, "transfer payload sizes in MB"),
}
LIMIT_OPTIONS = {  # option -> what it sets (the Grids field of the same name)
    "--max-step-tokens": "leave out prefill steps computing more new tokens",
    "--max-encode-patches": "leave out vision batches of more patches",
    "--warmup": "untimed runs before each shape",
    "--repeats": "timed runs per shape (the median is kept)",
}


def add_profile_parser(sub: argparse._SubParsersAction, formatter: type[argparse.HelpFormatter]) -> None:
    p = sub.add_parser(
        "profile",
        help="measure per-stage costs on a device and fit the simulator's cost model",
        description="Time the encoder (by images and patches), prefill steps (by new tokens, cached "
        "tokens and sequences), decode steps (by batch and context) with the real model on one "
        "device, and transfers (by bytes) through the connectors between two devices; fit a small "
        "model per stage, print each fit's error and save everything as JSON for `epd simulate` "
        "and `epd plan`.",
        formatter_class=formatter,
    )
    add_profile_options(p)
    p.set_defaults(func=run_profile, parser=p)


def add_profile_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("what to profile")
    g.add_argument("--model", default=None, help="model directory (default: the built-in demo model)")
    g.add_argument("--device", default=None, help="compute device (default: cuda:0 if present, else cpu)")
    g.add_argument(
        "--dtype",
        default=None,
        choices=["float32", "float16", "bfloat16"],
        help="model dtype (default: bfloat16 on CUDA, float32 on the CPU)",
    )
    g.add_argument(
        "--load-format",
        default="auto",
        choices=["auto", "safetensors", "dummy"],
        help="dummy: random weights of the real shapes; auto: dummy where the directory has no weights",
    )
    g.add_argument(
        "--kv-cache-gib",
        type=float,
        default=None,
        help="KV cache at most this big (default: half the free GPU memory, at most 32; 1 on a CPU)",
    )
    g.add_argument("--devices", default=None, help="producer,consumer of transfers (default: --device twice)")
    g.add_argument(
        "--connectors",
        default=None,
        help="comma-separated connectors to time (default: cuda_ipc between GPUs, else shm,tcp)",
    )
    g.add_argument(
        "--threads",
        type=int,
        default=None,
        help="torch threads while timing (default: 1 on a CPU, as each instance of a several-instance "
        "layout gets on a small host; as they are on CUDA)",
    )
    g.add_argument(
        "--stages",
        default=",".join(STAGE_NAMES),
        help="comma-separated stages to measure (front_end, patches: this host's CPU around the model, "
        "the API process's request handling and the encoding side's image decoding; no device used)",
    )
    g.add_argument(
        "--tp",
        default="1",
        help="comma-separated tensor-parallel degrees whose prefill and decode steps to measure (e.g. "
        "1,2,4): each degree N > 1 runs an instance of N ranks, on cuda:0..N-1 (nccl) or on the CPU "
        "(gloo); degree 1 is always measured, on --device",
    )
    g.add_argument("--out", default="profile.json", help="where to write the profile (JSON)")
    _shape_options(p.add_argument_group("shapes (comma-separated lists; defaults depend on the device)"))


def _shape_options(g: argparse._ArgumentGroup) -> None:
    from epd.plan.profile.grids import default_grids  # plain Python: --help stays instant

    cuda, cpu = default_grids("cuda"), default_grids("cpu")

    def defaults(field: str) -> str:
        values = (getattr(cuda, field), getattr(cpu, field))
        shown = [",".join(map(str, v)) if isinstance(v, tuple) else str(v) for v in values]
        return f"(default: {shown[0]} on CUDA, {shown[1]} on a CPU)"

    g.add_argument("--quick", action="store_true", help="fewer shapes and repetitions")
    for option, (field, _, text) in GRID_OPTIONS.items():
        g.add_argument(option, default=None, help=f"{text} {defaults(field)}")
    for option, text in LIMIT_OPTIONS.items():
        g.add_argument(option, type=int, default=None, help=f"{text} {defaults(_dest(option))}")


def run_profile(args: argparse.Namespace) -> int:
    import torch

    from epd.plan.profile.profiler import ProfileOptions, check_degrees, profile_device, resolve_target
    from epd.plan.profile.report import format_report

    model = args.model or _demo_model(args)
    try:
        target = resolve_target(model, args.device, args.dtype, args.load_format, args.kv_cache_gib)
        devices = _parse_list(args.devices, str) or [target.device]
        options = ProfileOptions(
            target,
            grids_from(args, torch.device(target.device).type),
            tuple(_parse_list(args.stages, str)),
            (devices[0], devices[-1]),
            tuple(_parse_list(args.connectors, str)) or None,
            args.threads or (None if torch.device(target.device).type == "cuda" else 1),
            tuple(_parse_list(args.tp, int)),
        )
        check_degrees(target, options.degrees)
    except ValueError as e:
        args.parser.error(str(e))
    profile = profile_device(options, log=lambda line: print(line, flush=True))
    profile.save(args.out)
    print(format_report(profile))
    print(f"wrote {args.out}")
    return 0


def grids_from(args: argparse.Namespace, device_type: str):
    """The device's default grids with the options given on the command line."""
    import dataclasses

    from epd.plan.profile.grids import default_grids

    changes = {}
    for option, (field, kind, _) in GRID_OPTIONS.items():
        if getattr(args, _dest(option)):
            changes[field] = tuple(_parse_list(getattr(args, _dest(option)), kind))
    for option in LIMIT_OPTIONS:
        if getattr(args, _dest(option)) is not None:
            changes[_dest(option)] = getattr(args, _dest(option))
    return dataclasses.replace(default_grids(device_type, args.quick), **changes)


def _demo_model(args: argparse.Namespace) -> str:
    from epd.demo import DEMO_MODEL_DIR

    if not (DEMO_MODEL_DIR / "config.json").exists():
        args.parser.error("--model is required (the built-in demo model is missing from this install)")
    return str(DEMO_MODEL_DIR)


def _dest(option: str) -> str:
    return option.lstrip("-").replace("-", "_")


def _parse_list(text: str | None, kind: type) -> list:
    if not text:
        return []
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"expected a comma-separated list of {kind.__name__}, got {text!r}") from None
