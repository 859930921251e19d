"""The `epd` command. Subcommands: `serve` (the OpenAI-compatible server), `bench` (the serving
benchmark, epd/bench/serve), `simulate` (the benchmark on a simulated layout, epd/sim), `profile`
(stage costs on a device, fitted: epd/plan/profile), `plan` (the best layout and knobs for a
workload and SLOs, searched on the simulator: epd/plan/search). Each is an
`add_<name>_parser(subparsers)` that sets `func`.

    epd serve --model /path/to/Qwen2.5-VL-3B-Instruct --layout 1E+1P+1D
    epd bench --base-url http://127.0.0.1:8000 --rates 1,2,4 --slo-ttft 1 --slo-tpot 0.05
    epd simulate --layout 1E+1P+1D --profile profile.json --rates 1,2,4 --slo-ttft 1 --slo-tpot 0.05
    epd profile --model DIR --device cuda:0 --load-format dummy --dtype bfloat16 --out profile.json
    epd plan --profile profile.json --gpus 4 --slo-ttft 2 --slo-tpot 0.05 --image-size 1344x1344

Imports of the engine happen inside the command, so `epd --help` answers at once.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from dataclasses import Field
from typing import TYPE_CHECKING, Any

from epd.bench.serve.cli import (
    add_arrival_options,
    add_bench_parser,
    add_slo_options,
    add_workload_options,
    check_workload_args,
)
from epd.entrypoints.options import OPTION, EngineArgs, Option, engine_options, parse_bytes
from epd.plan.profile.cli import add_profile_parser
from epd.plan.search.cli import add_plan_parser

if TYPE_CHECKING:  # the server pulls in torch: imported in the command, not for --help
    from epd.server.config import ServerConfig

# The types an option's annotation may name, for the fields that declare no parser of their own.
_SCALARS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}

API_KEY_ENV = "EPD_API_KEY"
# The `epd serve` options that shape a simulation: the layout, the connector and KV streaming its
# devices imply, and every size and limit of the engine's caches and batches.
SIMULATED_OPTIONS = (
    "layout", "device", "devices", "transfer", "kv_streaming", "dtype", "max_model_len", "block_size",
    "num_kv_blocks", "kv_cache_memory_bytes", "mm_cache_bytes", "enable_prefix_caching", "max_num_seqs",
    "max_num_batched_tokens", "enable_chunked_prefill", "scheduling_policy", "max_queue_wait",
    "role_switching", "role_switching_margin", "role_switching_dwell", "role_switching_window",
    "encode_ahead",
)  # fmt: skip


def default_model() -> str | None:
    """The model `epd serve` runs without --model: the built-in demo model (epd/demo/model)."""
    from epd.demo import DEMO_MODEL_DIR

    return str(DEMO_MODEL_DIR) if (DEMO_MODEL_DIR / "config.json").exists() else None


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows defaults, except the empty ones ("default: None" says nothing)."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        if action.default is None or action.default is False or action.default == argparse.SUPPRESS:
            return action.help
        return super()._get_help_string(action)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="epd", description="Encode-Prefill-Decode disaggregated serving for vision-language models."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    add_serve_parser(sub)
    add_bench_parser(sub, _HelpFormatter)
    add_simulate_parser(sub)
    add_profile_parser(sub, _HelpFormatter)
    add_plan_parser(sub, _HelpFormatter)
    return parser


def add_serve_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "serve",
        help="serve a model over an OpenAI-compatible HTTP API",
        description="Start the engine instances of a layout, then serve /v1/chat/completions, "
        "/v1/completions, /v1/models, /health and /metrics until SIGINT/SIGTERM.",
        formatter_class=_HelpFormatter,
    )
    add_engine_option_flags(p)
    _server_options(p)
    _limit_options(p)
    p.set_defaults(func=run_serve, parser=p)


def add_engine_option_flags(
    p: argparse.ArgumentParser, only: Sequence[str] | None = None
) -> argparse._ArgumentGroup:
    """One flag per field of EngineArgs that is an option (those named in `only`), as declared there."""
    g = p.add_argument_group("model and engine")
    g.add_argument(
        "--model", default=None, help="model directory or Hub id ORG/NAME (default: the demo model)"
    )
    for f in engine_options():
        if only is None or f.name in only:
            _add_engine_option(g, f)
    return g


def _add_engine_option(g: argparse._ArgumentGroup, f: Field) -> None:
    opt: Option = f.metadata[OPTION]
    flag = opt.flag or "--" + f.name.replace("_", "-")
    kind = _SCALARS[f.type.removesuffix(" | None")]  # annotations are strings (postponed)
    if kind is not bool:
        # argparse runs a str default through `type`: "1GiB" in --help, 1 << 30 in the namespace
        shown = opt.show(f.default) if opt.show and f.default is not None else f.default
        g.add_argument(
            flag, dest=f.name, type=opt.parse or kind, default=shown, choices=opt.choices, help=opt.help
        )
    elif f.default is None:  # unset: the engine decides; --x / --no-x: on / off
        g.add_argument(flag, dest=f.name, action=argparse.BooleanOptionalAction, default=None, help=opt.help)
    else:  # on by default: the flag (--disable-prefix-caching) turns it off
        g.add_argument(flag, dest=_dest(f), action="store_true", help=opt.help)


def engine_option_value(args: argparse.Namespace, f: Field) -> Any:
    value = getattr(args, _dest(f))
    return not value if _is_off_switch(f) else value


def _dest(f: Field) -> str:
    """Where the namespace keeps a field's flag: under the field's name, except an off switch,
    which keeps the flag's own name (args.disable_prefix_caching, not enable_prefix_caching)."""
    return f.metadata[OPTION].flag.lstrip("-").replace("-", "_") if _is_off_switch(f) else f.name


def _is_off_switch(f: Field) -> bool:
    return f.default is True


def _server_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("HTTP server")
    g.add_argument("--served-model-name", default=None, help="name clients use in 'model' (default: --model)")
    g.add_argument("--host", default="127.0.0.1", help="interface to listen on (0.0.0.0: all)")
    g.add_argument("--port", type=int, default=8000, help="port to listen on (0: any free port)")
    g.add_argument(
        "--api-key",
        default=None,
        help=f"require 'Authorization: Bearer KEY' on /v1 routes (default: ${API_KEY_ENV} if set)",
    )
    g.add_argument(
        "--max-queued-requests",
        type=int,
        default=1024,
        help="admitted requests at once (input processing to last token); more get 429. 0: no limit",
    )
    g.add_argument(
        "--max-request-bytes", type=parse_bytes, default="32MiB", help="largest request body (413)"
    )
    g.add_argument(
        "--max-buffered-request-bytes",
        type=parse_bytes,
        default=None,
        help="request body bytes held at once while being received, all connections together; "
        "a body past it gets 503 with Retry-After (default: 4 x --max-request-bytes)",
    )
    g.add_argument(
        "--header-read-timeout",
        type=float,
        default=30.0,
        help="seconds a client has to send a request's headers, from connecting or from the first "
        "byte of a later request on the connection (408 after)",
    )
    g.add_argument(
        "--body-read-timeout",
        type=float,
        default=30.0,
        help="seconds a request body may go without a byte while being received (408 after)",
    )
    g.add_argument(
        "--shutdown-timeout",
        type=float,
        default=30.0,
        help="seconds in-flight requests get to finish on SIGINT/SIGTERM; then they are aborted "
        "(open streams end with an error event and [DONE])",
    )
    g.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"], help="log verbosity"
    )


def _limit_options(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group(
        "input limits",
        "Fixed, besides these: at most 2048 messages and 4096 content parts per request, and prompt "
        "text that could never fit --max-model-len is refused before it is tokenized.",
    )
    g.add_argument("--max-images-per-request", type=int, default=16, help="images in one request")
    g.add_argument(
        "--max-video-frames",
        type=int,
        default=4096,
        help="frames per video file, checked from its header (sampling decodes up to the last one)",
    )
    g.add_argument(
        "--max-image-pixels",
        type=int,
        default=None,
        help="pixels per image, checked from the header before decoding (decompression bombs); "
        "default: 4 x the pixels the model's processor resizes images to (max_pixels in "
        "preprocessor_config.json), at least 4Mi: larger images are shrunk to max_pixels anyway",
    )
    g.add_argument("--max-image-bytes", type=parse_bytes, default="20MiB", help="encoded bytes per image")
    g.add_argument(
        "--allowed-local-media-path",
        default=None,
        metavar="DIR",
        help="allow file:// and plain-path images under DIR (default: local files refused)",
    )
    g.add_argument(
        "--allow-remote-media",
        action="store_true",
        help="fetch http(s) image URLs (public addresses only, no redirects to private ones)",
    )
    g.add_argument("--remote-media-timeout", type=float, default=10.0, help="seconds per remote image fetch")


def add_simulate_parser(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "simulate",
        help="run epd bench's workload on a simulated layout (virtual time, cost model)",
        description="Serve `epd bench`'s workload (same flags, same seed: the same requests) with the "
        "real router and schedulers of a layout on virtual time: compute takes what the cost model "
        "says (--profile, or linear costs), transfers latency + bytes / bandwidth. Writes `epd bench`'s "
        "results.json (marked simulated), plots and table: `epd bench plot` overlays real and "
        "simulated runs. The model directory is read for its config, tokenizer and processor only.",
        formatter_class=_HelpFormatter,
    )
    add_engine_option_flags(p, SIMULATED_OPTIONS)
    g = p.add_argument_group(
        "simulation",
        "The instances run here, on virtual time: --device, --devices and --transfer only pick the "
        "connector between them (as epd serve does), hence the profile's link costs and KV streaming, "
        "and whether instances that encode and prefill encode ahead (by default on CUDA, as in epd "
        "serve; --encode-ahead / --no-encode-ahead decide it). "
        "Each rate starts on a fresh cluster; --warmup requests are not simulated.",
    )
    g.add_argument("--profile", default=None, help="fitted costs of compute and links (epd profile's JSON)")
    g.add_argument(
        "--costs",
        default=None,
        metavar="NAME=S,...",
        help="without --profile, the linear costs in seconds: step_s (per forward), token_s (per token), "
        "sequence_s (per request in a batch), encode_s (per vision batch), patch_s (per patch); "
        "those not given keep their defaults",
    )
    g.add_argument(
        "--transfer-latency",
        type=float,
        default=None,
        help="seconds per transfer (default: the profile's, else 0)",
    )
    g.add_argument(
        "--transfer-bandwidth",
        type=float,
        default=None,
        help="bytes per second between two instances (default: the profile's, else unlimited)",
    )
    g.add_argument(
        "--control-latency", type=float, default=0.0, help="seconds per router <-> instance message"
    )
    add_workload_options(p)
    add_arrival_options(p)
    add_slo_options(p, out_prefix="sim")
    p.set_defaults(func=run_simulate, parser=p)


def run_simulate(args: argparse.Namespace) -> int:
    check_workload_args(args)
    from epd.sim.command import run_simulate_command

    return run_simulate_command(args, simulated_engine_args(args))


def simulated_engine_args(args: argparse.Namespace) -> EngineArgs:
    """The `epd serve` options of an `epd simulate` command line."""
    model = args.model or default_model()
    if model is None:
        args.parser.error("--model is required (the built-in demo model is missing from this install)")
    options = {f.name: engine_option_value(args, f) for f in engine_options() if f.name in SIMULATED_OPTIONS}
    # The TTFT objective attainment is measured against is the deadline `--scheduling-policy slo`
    # schedules for: one flag, the benchmark's.
    options["slo_ttft"] = getattr(args, "slo_ttft", None)
    return EngineArgs(model, **options)


def run_serve(args: argparse.Namespace) -> int:
    from epd.models.hub import resolve_model
    from epd.server.launch import serve

    model = args.model or default_model()
    if model is None:
        args.parser.error("--model is required (the built-in demo model is missing from this install)")
    try:  # a Hub id: its local snapshot, which every consumer then reads
        model_dir = resolve_model(model, args.revision, weights=args.load_format != "dummy")
    except FileNotFoundError as e:  # ModelNotFoundError: one line, no traceback
        logging.getLogger("epd.server").error("cannot start: %s", e)
        return 2
    try:
        config = server_config_from(args, model)  # clients name the model as typed
    except ValueError as e:
        args.parser.error(str(e))
    return serve(engine_args_from(args, model_dir), config)


def engine_args_from(args: argparse.Namespace, model: str) -> EngineArgs:
    from epd.inputs.processor import InputLimits
    from epd.server.fetch import RemoteMediaFetcher

    fetcher = RemoteMediaFetcher(timeout_s=args.remote_media_timeout) if args.allow_remote_media else None
    limits = InputLimits(
        max_images_per_request=args.max_images_per_request,
        allowed_local_media_path=args.allowed_local_media_path,
        max_image_pixels=max_image_pixels_of(args, model),
        max_image_bytes=args.max_image_bytes,
        remote_fetcher=fetcher,
        max_video_frames=args.max_video_frames,
    )
    options = {f.name: engine_option_value(args, f) for f in engine_options()}
    return EngineArgs(model, **options, limits=limits)


def max_image_pixels_of(args: argparse.Namespace, model: str) -> int:
    """--max-image-pixels, or its default from the model's preprocessor_config.json."""
    from epd.inputs.image_processor import ImageProcessorConfig
    from epd.server.config import default_max_image_pixels

    if args.max_image_pixels is not None:
        return args.max_image_pixels
    return default_max_image_pixels(ImageProcessorConfig.from_pretrained(model).max_pixels)


def server_config_from(args: argparse.Namespace, model: str) -> ServerConfig:
    from epd.server.config import ServerConfig

    return ServerConfig(
        served_model_name=args.served_model_name or model,
        host=args.host,
        port=args.port,
        api_key=args.api_key or os.environ.get(API_KEY_ENV) or None,
        max_request_bytes=args.max_request_bytes,
        max_buffered_request_bytes=args.max_buffered_request_bytes,
        max_queued_requests=args.max_queued_requests or None,
        header_read_timeout_s=args.header_read_timeout,
        body_read_timeout_s=args.body_read_timeout,
        allowed_local_media_path=args.allowed_local_media_path,
        allow_remote_media=args.allow_remote_media,
        remote_media_timeout_s=args.remote_media_timeout,
        shutdown_grace_s=args.shutdown_timeout,
        log_level=args.log_level,
    )


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=getattr(args, "log_level", "info").upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
