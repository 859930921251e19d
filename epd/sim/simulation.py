"""`epd simulate`: `epd bench`'s workload served by a layout's real cores on virtual time.

    for each rate: a fresh SimCluster -> the rate's requests, as `epd bench` draws them
        (bench_requests) -> simulate (harness) -> what its client would have measured (bench_results)
    then: results.json in `epd bench`'s format (plus "simulated" and "simulation"), its PNG plots
    and summary table, so `epd bench plot real/results.json sim/results.json` overlays the two

Each rate starts on a fresh cluster (the benchmark's warm-up requests are not sent): the same seed
gives the same requests, the same event log and the same results, apart from wall times.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

from rich.console import Console

from epd.bench.serve.plots import write_plots
from epd.bench.serve.report import print_report
from epd.bench.serve.results import document, run_record, save
from epd.bench.serve.spec import BenchSpec
from epd.inputs.processor import InputProcessor
from epd.sim.bench_requests import bench_run
from epd.sim.bench_results import request_results, run_duration
from epd.sim.cluster import ClusterSpec, SimCluster
from epd.sim.harness import simulate
from epd.sim.images import SizedImageProcessor
from epd.sim.runner import cost_model_compute


@dataclasses.dataclass(frozen=True)
class SimulateSpec:
    bench: BenchSpec  # the workload, rates, SLOs and seed, as `epd bench` takes them
    cluster: ClusterSpec  # the layout, engine, costs and links
    connector: str  # what the simulated links stand for (cuda_ipc, shm, tcp)
    profile: dict | None = None  # where the fitted costs came from (path, sha256, meta); None: linear
    tokenizer_dir: str | None = None  # for prompt text of exact token counts, as `epd bench`
    options: dict = dataclasses.field(default_factory=dict)  # the `epd serve` options, as given


def run_simulation(spec: SimulateSpec, out_dir: Path, console: Console) -> dict:
    """Simulate every rate of `spec`; write the results under `out_dir`; return them."""
    out_dir.mkdir(parents=True, exist_ok=True)
    processor = SizedImageProcessor.from_pretrained(spec.cluster.engine.model.model)
    runs, figures = [], []
    for index in range(len(spec.bench.arrivals)):
        run, figure = simulate_rate(spec, index, processor)
        runs.append(run)
        figures.append(figure)
        console.print(f"{run['label']}: simulated {figure['virtual_s']:.2f} s in {figure['wall_s']:.2f} s")
    doc = simulated_document(spec, runs, figures)
    files = [save(doc, out_dir), *write_plots([doc], out_dir)]
    print_report(doc, files, console)
    return doc


def simulate_rate(spec: SimulateSpec, index: int, processor: InputProcessor) -> tuple[dict, dict]:
    """Rate `index`: its run record (the benchmark's) and the simulation's own figures."""
    started = time.perf_counter()
    arrival = spec.bench.arrivals[index]
    cluster = SimCluster(spec.cluster, cost_model_compute)  # each instance at its degree
    run = bench_run(spec.bench, index, processor, cluster.router.max_model_len, spec.tokenizer_dir)
    simulated = time.perf_counter()
    result = simulate(cluster, list(run.requests.values()), arrival.max_concurrency)
    done = time.perf_counter()
    record = run_record(arrival, request_results(run, result), run_duration(run, result), spec.bench.slo)
    figure = {
        "rate": arrival.rate,
        "wall_s": done - started,
        "simulate_wall_s": done - simulated,  # the event loop alone, without drawing the requests
        "virtual_s": result.end_time,
        "log_entries": len(result.log),
        "log_digest": result.log.digest(),
        "leftovers": result.leftovers,
        "busy_s": result.busy_s,
        "role_switches": result.switches,  # with --role-switching auto: what it switched, when
    }
    return record, figure


def simulated_document(spec: SimulateSpec, runs: list[dict], figures: list[dict]) -> dict:
    model = spec.cluster.engine.model.model
    server = {"base_url": None, "model": model, "models": None, "epd_timings": True}
    return document(spec.bench, server, runs) | {
        "simulated": True,
        "simulation": simulation_record(spec, figures),
    }


def simulation_record(spec: SimulateSpec, figures: list[dict]) -> dict:
    """How the runs were simulated: layout, costs (and their profile), links, engine limits."""
    c = spec.cluster
    engine = c.engine
    return {
        "layout": c.layout,
        "profile": spec.profile,
        "costs": _describe(c.costs),
        "transfer": {
            "connector": spec.connector,
            "latency_s": c.transfer_latency_s,
            "bytes_per_s": c.transfer_bandwidth,
        },
        "control_latency_s": c.control_latency_s,
        "kv_streaming": c.kv_streaming,
        "max_encode_batch_patches": c.max_encode_batch_patches,
        # Instances that encode and prefill: images beside the steps, the GPU shared (epd.sim.gpu_share).
        "encode_ahead": {"on": bool(engine.encode_ahead), "overlap_speed": c.overlap_speed},
        "num_kv_blocks": engine.cache.num_kv_blocks,  # per instance, derived as the engine does
        "serve_options": spec.options,
        "warmup": "not simulated: each rate starts on a fresh cluster",
        "runs": figures,
    }


def _describe(costs: object) -> dict | str:
    if dataclasses.is_dataclass(costs) and not isinstance(costs, type):
        return {"type": type(costs).__name__, **dataclasses.asdict(costs)}
    return repr(costs)
