"""`epd profile` end to end: measure each stage on the target device, fit it, gather the metadata.

    profile = profile_device(ProfileOptions(target, grids, ...))
    profile.save("profile.json")

Compute first (one model load), then the steps of each tensor-parallel degree asked for (`degrees`:
one spawned process per rank, the parent's model freed), then transfers (a GPU payload needs the
memory).
"""

from __future__ import annotations

import datetime
import gc
import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from epd.plan.profile.features import TERMS, terms_of
from epd.plan.profile.fit import fit_stage
from epd.plan.profile.grids import Grids
from epd.plan.profile.measure import ModelBench, Target
from epd.plan.profile.measure_transfer import default_connectors, time_transfers
from epd.plan.profile.store import (
    COMPUTE_STAGES,
    HOST_STAGES,
    PARALLEL_STAGES,
    Measurement,
    ParallelProfile,
    Profile,
    ProfileMeta,
    StageProfile,
)

STAGES = (*COMPUTE_STAGES, "transfer", *HOST_STAGES)
Log = Callable[[str], None]


@dataclass(frozen=True)
class ProfileOptions:
    target: Target
    grids: Grids
    stages: tuple[str, ...] = STAGES
    transfer_devices: tuple[str, str] = ("cpu", "cpu")  # producer, consumer
    connectors: tuple[str, ...] | None = None  # None: what the cluster uses between those devices
    # torch's intra-op threads while timing (None: as they are). A CPU instance of the cluster runs
    # with its share of the host's cores; on a busy host, more threads than free cores add stalls.
    threads: int | None = None
    # Tensor-parallel degrees > 1 whose prefill and decode steps to measure too (degree 1 always is).
    degrees: tuple[int, ...] = ()


def profile_device(options: ProfileOptions, log: Log = print) -> Profile:
    """Measure, fit and describe: a complete `Profile` of `options.target`."""
    unknown = set(options.stages) - set(STAGES)
    if unknown:
        raise ValueError(f"unknown stages {sorted(unknown)}; choose from {', '.join(STAGES)}")
    check_degrees(options.target, options.degrees)  # before minutes of measuring at degree 1
    started, threads = time.perf_counter(), torch.get_num_threads()
    torch.set_num_threads(options.threads or threads)
    try:
        stages, compute_info = _profile_compute(options, log)
        parallel = _profile_parallel(options, log)
        transfers = _profile_transfers(options, log) if "transfer" in options.stages else {}
        stages |= _profile_host(options, log)
    finally:
        torch.set_num_threads(threads)
    meta = ProfileMeta(
        device=options.target.device,
        device_name=device_name(options.target.device),
        dtype=options.target.dtype,
        model=str(Path(options.target.model).resolve()),
        model_config_sha256=model_config_hash(options.target.model),
        epd_version=epd_version(),
        torch_version=torch.__version__,
        load_format=options.target.load_format,
        attention_backend=compute_info.get("attention_backend", ""),
        graph_sizes=compute_info.get("graph_sizes", ()),
        created=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        wall_seconds=time.perf_counter() - started,
        extra={"grids": asdict(options.grids), "torch_threads": options.threads or threads},
    )
    return Profile(meta, stages, transfers, parallel)


def _profile_compute(options: ProfileOptions, log: Log) -> tuple[dict[str, StageProfile], dict]:
    wanted = [s for s in COMPUTE_STAGES if s in options.stages]
    if not wanted:
        return {}, {}
    bench = ModelBench(options.target, options.grids)
    info = {"graph_sizes": bench.graph_sizes, "attention_backend": bench.attention_backend}
    stages = {}
    try:
        for stage in wanted:
            measured = bench.time_encodes(log) if stage == "encode" else bench.time_steps(stage, log)
            if not measured:
                log(f"[{stage}] no shape of the grid fits this model: not measured")
                continue
            stages[stage] = fit_measurements(stage, measured, bench.graph_sizes)
    finally:
        del bench
        gc.collect()  # the runner's graphs and cache hold device memory the transfers may need
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    return stages, info


def check_degrees(target: Target, degrees: Sequence[int]) -> None:
    """ValueError when the model cannot be split some degree's ways, or the host lacks its GPUs."""
    from epd.plan.profile.measure_parallel import check_degree, rank_devices

    for degree in (d for d in degrees if d != 1):
        check_degree(target.model, degree)
        rank_devices(target.device, degree)


def _profile_parallel(options: ProfileOptions, log: Log) -> dict[int, ParallelProfile]:
    """Prefill and decode steps of an instance of each degree > 1 (epd.plan.profile.measure_parallel)."""
    from epd.plan.profile.measure_parallel import time_parallel

    wanted = tuple(s for s in PARALLEL_STAGES if s in options.stages)
    out = {}
    for degree in sorted({d for d in options.degrees if d > 1}) if wanted else ():
        log(f"[tp{degree}] {degree} ranks: {', '.join(wanted)} steps")
        timed = time_parallel(options.target, options.grids, degree, wanted, options.threads, verbose=True)
        stages = {}
        for stage, measured in timed.stages.items():
            if measured:
                stages[stage] = fit_measurements(stage, measured, timed.graph_sizes)
        out[degree] = ParallelProfile(stages, timed.devices, timed.backend, timed.graph_sizes)
    return out


def _profile_transfers(options: ProfileOptions, log: Log) -> dict[str, StageProfile]:
    devices, grids = options.transfer_devices, options.grids
    out = {}
    for name in options.connectors or default_connectors(devices):
        measured = time_transfers(name, devices, grids.transfer_mb, grids.warmup, grids.repeats, log)
        out[name] = fit_measurements("transfer", measured, devices=devices)
    return out


def _profile_host(options: ProfileOptions, log: Log) -> dict[str, StageProfile]:
    """The host CPU's work around the model (front end, patches): no device needed."""
    from epd.plan.profile.measure_host import time_host

    g, out = options.grids, {}
    for stage in (s for s in HOST_STAGES if s in options.stages):
        measured = time_host(stage, options.target.model, g.encode_sides, g.warmup, g.repeats, log)
        out[stage] = fit_measurements(stage, measured)
    return out


def fit_measurements(
    stage: str, measurements: Sequence[Measurement], graph_sizes: Sequence[int] = (), devices: tuple = ()
) -> StageProfile:
    """The stage's cost model fitted to its measurements (see epd.plan.profile.features)."""
    rows = [terms_of(stage, m.shape, graph_sizes) for m in measurements]
    # Compute may be bound by launching it (see epd.plan.profile.fit); a transfer's fixed cost
    # is its latency term.
    fit = fit_stage(TERMS[stage], rows, [m.seconds for m in measurements], floor=stage in COMPUTE_STAGES)
    return StageProfile(fit, tuple(measurements), tuple(devices))


def device_name(device: str) -> str:
    dev = torch.device(device)
    return torch.cuda.get_device_name(dev) if dev.type == "cuda" else dev.type


def model_config_hash(model_dir: str) -> str:
    """sha256 of config.json as canonical JSON: whitespace and key order do not change it."""
    config = json.loads((Path(model_dir) / "config.json").read_text())
    return hashlib.sha256(json.dumps(config, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def epd_version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("epd")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def resolve_target(
    model: str, device: str | None, dtype: str | None, load_format: str | None, kv_cache_gib: float | None
) -> Target:
    """Defaults that depend on the machine: the first GPU if there is one, bf16 there (fp32 on a
    CPU), random weights where the directory has none, a KV cache that leaves room for the rest."""
    if not (Path(model) / "config.json").exists():
        raise ValueError(f"{model!r} is not a model directory (no config.json)")
    device = device or ("cuda:0" if torch.cuda.is_available() else "cpu")
    on_cuda = torch.device(device).type == "cuda"
    dtype = dtype or ("bfloat16" if on_cuda else "float32")
    if load_format in (None, "auto"):
        load_format = "safetensors" if any(Path(model).glob("*.safetensors")) else "dummy"
    if kv_cache_gib is None:
        kv_cache_gib = _default_kv_gib(device) if on_cuda else 1.0
    return Target(model, device, dtype, load_format, int(kv_cache_gib * (1 << 30)))


def _default_kv_gib(device: str) -> float:
    """Half of what is free now, at most 32 GiB: weights, graphs and the largest vision batch's
    activations need the rest."""
    free, _ = torch.cuda.mem_get_info(torch.device(device))
    return min(32.0, free / 2 / (1 << 30))
