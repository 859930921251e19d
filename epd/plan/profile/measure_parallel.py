"""Timing prefill and decode steps of a tensor-parallel instance: rank 0's engine compute over its
workers, as an `@tpN` instance runs them (epd.parallel).

    run_on_ranks(N processes, spawned; gloo on the CPU, nccl with one GPU per rank)
      rank 0:    ModelBench over `instance_parts(group)`: each step sends its `RunStep` to the
                 workers, runs rank 0's share, the all-reduces meeting theirs; timed as at degree 1
                 (the host clock, rank 0's device synchronised), then `Stop`
      rank 1..:  `build_worker` (the share rank 0's `BuildRank` describes), its KV cache filled
                 with random values as rank 0's is, then `serve` until `Stop`

So a step's time holds what an instance of that degree pays: its command pickled and broadcast, the
split matmuls, the all-reduces, the replicated logits. Decode steps replay CUDA graphs wherever the
device allows, as an instance's do (every rank captures the same sizes: `graph_sizes`, which the
decode model is fitted with). Not measured at degree > 1: vision batches (the tower runs on rank 0
alone, whole: the degree-1 encode model prices them).

Ranks take devices as `run_on_ranks` gives them: cuda:0 .. cuda:N-1 on a GPU host (rank r on
cuda:r, whatever --device says), the CPU otherwise.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable

import torch

from epd.models.config import VLModelConfig
from epd.parallel.group import TensorParallelGroup
from epd.parallel.launch import run_on_ranks
from epd.parallel.sharding import check_splittable
from epd.plan.profile.grids import Grids
from epd.plan.profile.measure import ModelBench, Target
from epd.plan.profile.store import PARALLEL_STAGES, Measurement

Log = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class ParallelTimings:
    degree: int
    devices: tuple[str, ...]  # of ranks 0..N-1
    backend: str  # of the collectives: "gloo" or "nccl"
    stages: dict[str, list[Measurement]]  # "prefill", "decode": those asked for
    graph_sizes: tuple[int, ...] = ()  # decode batch sizes replayed as CUDA graphs (): none


def check_degree(model_dir: str, degree: int) -> None:
    """A clear error, before any process starts, when the model cannot be split `degree` ways."""
    if degree < 2:
        raise ValueError(f"a tensor-parallel degree to measure is >= 2, not {degree}")
    check_splittable(VLModelConfig.from_pretrained(model_dir).text, degree)


def rank_devices(device: str, degree: int) -> tuple[str, ...]:
    """Where `run_on_ranks` puts each rank: one GPU each (cuda:0 ..) on CUDA, else the CPU."""
    if torch.device(device).type == "cuda":
        if torch.cuda.device_count() < degree:
            raise ValueError(
                f"tensor-parallel degree {degree} needs {degree} GPUs; this host has "
                f"{torch.cuda.device_count()}"
            )
        return tuple(f"cuda:{rank}" for rank in range(degree))
    return ("cpu",) * degree


def time_parallel(
    target: Target, grids: Grids, degree: int, stages: tuple[str, ...], threads: int | None, verbose: bool
) -> ParallelTimings:
    """Every step of `stages`' grids timed on an instance of `degree` ranks."""
    check_degree(target.model, degree)
    devices = rank_devices(target.device, degree)
    backend = "nccl" if devices[0].startswith("cuda") else "gloo"
    wanted = tuple(s for s in PARALLEL_STAGES if s in stages)
    results = run_on_ranks(_measure_rank, degree, target, grids, wanted, threads, verbose, backend=backend)
    stages, graph_sizes = results[0]
    return ParallelTimings(degree, devices, backend, stages, graph_sizes)


def _measure_rank(
    group: TensorParallelGroup,
    target: Target,
    grids: Grids,
    stages: tuple[str, ...],
    threads: int | None,
    verbose: bool,
) -> tuple[dict[str, list[Measurement]], tuple[int, ...]] | None:
    """One rank's part (spawned by `run_on_ranks`): rank 0 times (its timings, and the graph sizes
    its decode steps replay), the workers execute."""
    if threads:
        torch.set_num_threads(threads)
    device = "cpu" if target.device.startswith("cpu") else f"cuda:{group.rank}"
    if group.rank != 0:
        _serve_as_worker(group, device)
        return None
    from epd.parallel.parts import instance_parts

    degree = group.world_size
    rank0 = dataclasses.replace(target, device=device)
    bench = ModelBench(rank0, grids, instance_parts(group), encode_locally=False)
    log = _rank_log(degree, verbose)
    try:
        return {stage: bench.time_steps(stage, log) for stage in stages}, bench.graph_sizes
    finally:
        bench.runner.stop_workers()


def _serve_as_worker(group: TensorParallelGroup, device: str) -> None:
    from epd.parallel.worker import build_worker

    worker = build_worker(group, device)
    worker.runner.kv_cache.normal_()  # as rank 0's bench does: never time on zeros
    worker.serve()


def _rank_log(degree: int, verbose: bool) -> Log:
    """Rank 0's progress lines (printed by the spawned process itself: a callback does not pickle)."""

    def log(line: str) -> None:
        if verbose:
            print(f"[tp{degree}] {line}", flush=True)

    return log
