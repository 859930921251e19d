"""The `epd simulate` command: its flags (parsed in epd/cli.py) -> a `SimulateSpec` -> a run.

The engine flags are `epd serve`'s and are read the way it reads them (`EngineArgs`): the same
command line sizes the same KV cache, MM caches and batches (counted from the real model config;
the simulation then runs with narrow embeddings, epd.sim.model_shape). The instances themselves run
here on the CPU, whatever `--device` says; the devices decide what they decide in `epd serve`: the
connector between instances (cuda_ipc between GPUs of this host, else shm), and so the profile's
link costs and whether KV streams by layer; and whether an instance that holds the tower and the
language model encodes ahead (`EngineConfig.encodes_ahead`: by default on CUDA; --no-encode-ahead:
in the steps), which the simulation models on a second lane of its GPU (epd.sim.gpu_share).

Costs: `--profile` (epd.plan.profile: fitted compute costs, per-connector links and, when measured,
the host CPU's front end and image decoding, epd.sim.host_costs); without it
`LinearCosts` with `--costs` overrides and free links. A layout with `@tpN` groups needs a profile
measured at those degrees (`epd profile --tp 1,N`); linear costs price every instance alike.
`--transfer-latency` and `--transfer-bandwidth` override the links either way.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import logging
import math
from collections.abc import Sequence
from pathlib import Path

import torch
from rich.console import Console

from epd.bench.serve.cli import arrivals_from_args, out_dir_of, workload_from_args
from epd.bench.serve.spec import SLO, BenchSpec
from epd.cluster.cluster import resolve_kv_streaming, resolve_transfer
from epd.cluster.instance import InstanceConfig
from epd.cluster.layout import Layout
from epd.config import EngineConfig
from epd.engine.kv_cache import num_blocks_for_memory
from epd.engine.scripted_runner import ComputeCosts
from epd.entrypoints.options import EngineArgs
from epd.sim.cluster import ClusterSpec
from epd.sim.costs import DegreeCosts, check_degrees, parse_costs
from epd.sim.host_costs import HostCosts
from epd.sim.model_shape import narrow_mm_cache_bytes, narrow_model
from epd.sim.simulation import SimulateSpec, run_simulation
from epd.sim.wire import ModelWireBytes

logger = logging.getLogger("epd.simulate")
FREE_LINK = (0.0, math.inf)  # (latency s, bytes per second) without a profile
MM_BLOCK_SIZE = InstanceConfig.mm_block_size  # what every instance's MM cache uses


def run_simulate_command(args: argparse.Namespace, engine_args: EngineArgs) -> int:
    console = Console()
    try:
        run_simulation(simulate_spec(args, engine_args), out_dir_of(args, "sim"), console)
    except (ValueError, OSError) as e:  # bad flags, files or profile: the reason, no traceback
        console.print(f"[red]epd simulate: {e}[/red]")
        return 1
    return 0


def simulate_spec(args: argparse.Namespace, engine_args: EngineArgs) -> SimulateSpec:
    real = engine_args.engine_config()
    devices = serve_devices(engine_args)
    engine = sim_engine_config(real, devices)
    connector = connector_of(engine_args)
    costs = cost_source(args.profile, args.costs, connector)
    _check_dtype(costs.profile, engine_args.dtype)
    _check_device(costs.profile, devices)
    _check_degrees(costs.compute, engine_args.layout)
    latency, bandwidth = costs.link
    cluster = ClusterSpec(
        engine_args.layout,
        engine,
        costs.compute,
        control_latency_s=args.control_latency,
        transfer_latency_s=latency if args.transfer_latency is None else args.transfer_latency,
        transfer_bandwidth=bandwidth if args.transfer_bandwidth is None else args.transfer_bandwidth,
        wire_bytes=ModelWireBytes.of(real.model),
        mm_cache_bytes=narrow_mm_cache_bytes(real.model, engine_args.mm_cache_bytes, MM_BLOCK_SIZE),
        kv_streaming=resolve_kv_streaming(engine_args.kv_streaming, connector),
        role_switching=engine_args.role_switching_options(),  # predicts with this simulation's costs
        host_costs=costs.host,
    )
    tokenizer = args.tokenizer or engine_args.model
    options = {
        f.name: getattr(engine_args, f.name) for f in dataclasses.fields(engine_args) if f.name != "limits"
    }
    return SimulateSpec(bench_spec(args, engine_args), cluster, connector, costs.profile, tokenizer, options)


def bench_spec(args: argparse.Namespace, engine_args: EngineArgs) -> BenchSpec:
    """The benchmark these flags describe, as `epd bench` reads them, aimed at no server."""
    return BenchSpec(
        base_url="simulated",
        model=engine_args.model,
        workload=workload_from_args(args),
        arrivals=arrivals_from_args(args),
        slo=SLO(args.slo_ttft, args.slo_tpot),
        num_requests=args.num_requests,
        warmup=args.warmup,
        seed=args.seed,
        epd_timings="on",
        progress=False,
        label=args.label or f"sim {engine_args.layout}",
    )


def sim_engine_config(config: EngineConfig, devices: Sequence[str] = ()) -> EngineConfig:
    """`config` (`epd serve`'s for the flags) as simulated: on the CPU, narrow embeddings, the KV
    block count the engine derives from --kv-cache-memory-bytes and the real model's shape, and
    encode-ahead as `config` decides it on the instances' `devices` (default: its own device).
    A layout on both CPUs and GPUs encodes ahead only if every instance's device would, as it
    gets cuda_ipc only if every one is a GPU (the simulated instances share one config)."""
    cache, model = config.cache, config.model
    blocks = cache.num_kv_blocks or num_blocks_for_memory(
        model.hf.text, cache.block_size, model.torch_dtype, cache.kv_cache_memory_bytes
    )
    cache = dataclasses.replace(cache, num_kv_blocks=blocks)
    ahead = all(config.encodes_ahead(torch.device(d)) for d in devices or [config.device])
    return dataclasses.replace(
        config, model=narrow_model(model), cache=cache, device="cpu", encode_ahead=ahead
    )


def serve_devices(engine_args: EngineArgs) -> list[str]:
    """The device of each instance (its rank 0's) where `epd serve` would start it."""
    layout = Layout.parse(engine_args.layout)
    return [spec.device for spec in layout.instances(engine_args.devices or engine_args.device)]


def connector_of(engine_args: EngineArgs) -> str:
    """The connector `epd serve` would choose between these instances (epd.cluster.cluster)."""
    count = Layout.parse(engine_args.layout).num_instances
    devices = engine_args.devices.split(",") if engine_args.devices else [engine_args.device] * count
    return resolve_transfer(engine_args.transfer, devices)


@dataclasses.dataclass(frozen=True)
class CostSource:
    compute: ComputeCosts
    link: tuple[float, float]  # (latency s, bytes per second) of each pair of instances
    profile: dict | None = None  # its path, sha256 and own meta; None: linear costs
    host: HostCosts | None = None  # the CPU's work around the model, if the profile measured it


def cost_source(profile: str | None, overrides: str | None, connector: str) -> CostSource:
    """The fitted costs of `profile` (its link for `connector`), or linear ones and free links."""
    if profile is None:
        return CostSource(parse_costs(overrides or ""), FREE_LINK)
    if overrides:
        raise ValueError("--costs adjusts the built-in linear costs; with --profile the fitted ones are used")
    try:
        from epd.plan.profile import load_profile  # imported only when a profile is given
    except ImportError as e:
        raise ValueError(f"--profile needs epd.plan.profile, which cannot be imported: {e}") from None
    fitted = load_profile(profile)
    try:
        link = fitted.transfer(connector)
    except KeyError as e:  # not profiled: say which were
        raise ValueError(f"{profile}: {e.args[0]}") from None
    return CostSource(fitted.compute_costs(), link, _profile_record(profile, fitted), fitted.host_costs())


def _profile_record(path: str, fitted: object) -> dict:
    meta = getattr(fitted, "meta", None)
    return {
        "path": str(Path(path).resolve()),
        "sha256": hashlib.sha256(Path(path).read_bytes()).hexdigest(),
        "meta": dataclasses.asdict(meta) if dataclasses.is_dataclass(meta) else None,
    }


def _check_degrees(costs: ComputeCosts, layout: str) -> None:
    """Every tensor-parallel degree of the layout priced (a profile's error says which it lacks)."""
    degrees = Layout.parse(layout).group_degrees
    check_degrees(costs, degrees)
    if max(degrees) > 1 and not isinstance(costs, DegreeCosts):
        logger.warning("linear costs price a tensor-parallel instance as one of degree 1")


def _check_device(profile: dict | None, devices: Sequence[str]) -> None:
    """A profile measured on a GPU, instances placed on CPUs: allowed, but said, as `epd serve`
    would then encode in the steps and send by shm, which the simulation follows."""
    measured = ((profile or {}).get("meta") or {}).get("device") or ""
    if measured.startswith("cuda") and not all(d.startswith("cuda") for d in devices):
        logger.warning(
            "the profile measured %s; --device/--devices place instances on %s, where epd serve "
            "would encode images in the steps and send by shm (serve's devices give its choices)",
            measured,
            ",".join(sorted(set(devices))),
        )


def _check_dtype(profile: dict | None, dtype: str) -> None:
    """Costs measured in one dtype, bytes counted in another: allowed (a what-if), but said."""
    measured = ((profile or {}).get("meta") or {}).get("dtype")
    if measured is not None and measured != dtype:
        logger.warning("the profile measured %s; the simulation counts bytes in --dtype %s", measured, dtype)
