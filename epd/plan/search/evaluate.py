"""One configuration at one rate, simulated as `epd simulate` would with the same flags.

A configuration is a layout and its knobs on `layout.num_devices` GPUs (cuda:0, cuda:1, ...: one
per instance, N per `@tpN` instance):
its `EngineArgs` are the plan's engine options with those set, turned into a simulation by
epd.sim.command.simulate_spec, run at one rate by epd.sim.simulation.simulate_rate and summed up by
`epd bench`'s own metrics (attainment, p90s). Every rate draws the same requests (rate 0 of the
bench spec) and the same arrival gaps scaled by the rate, so rates compare like for like.

The evaluator counts simulations against the plan's budget and answers None once it is spent.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
from dataclasses import dataclass

from epd.bench.serve.metrics import ATTAINMENT_TARGET
from epd.bench.serve.spec import ArrivalSpec
from epd.cluster.layout import Layout
from epd.engine.scripted_runner import ComputeCosts
from epd.entrypoints.options import EngineArgs
from epd.plan.search.knobs import Knobs
from epd.plan.search.role_time import RoleTimer, bottleneck
from epd.sim.bench_requests import bench_run
from epd.sim.cluster import SimCluster
from epd.sim.command import simulate_spec
from epd.sim.images import SizedImageProcessor
from epd.sim.runner import cost_model_compute
from epd.sim.simulation import SimulateSpec, simulate_rate
from epd.sim.workload import SimRequest


@dataclass(frozen=True)
class Config:
    layout: Layout
    knobs: Knobs
    policy: str | None = None  # --scheduling-policy (epd.plan.search.policies); None: the plan's flag

    @property
    def gpus(self) -> int:
        return self.layout.num_devices

    def describe(self) -> str:
        policy = "" if self.policy is None else f", policy {self.policy}"
        return f"{self.layout.text} ({self.knobs.describe()}{policy})"


@dataclass(frozen=True)
class Trial:
    """What one simulation of a configuration at one rate measured."""

    rate: float
    attainment: float
    ttft_p90: float | None
    tpot_p90: float | None
    e2e_p50: float | None
    completed: int
    busy_shares: dict[str, float]  # by role letter (epd.plan.search.role_time)
    slo_use: float  # the larger of TTFT p90 / its SLO and TPOT p90 / its SLO: below 1, headroom

    @property
    def passed(self) -> bool:
        return self.attainment >= ATTAINMENT_TARGET

    @property
    def bottleneck(self) -> str:
        return bottleneck(self.busy_shares)


def engine_args_for(base: EngineArgs, config: Config) -> EngineArgs:
    """`base` with the configuration's layout, one GPU per rank of each instance, its knobs and
    its queue policy."""
    gpus = config.gpus
    devices = {"device": "cuda:0", "devices": None} if gpus == 1 else {"devices": gpu_list(gpus)}
    policy = {} if config.policy is None else {"scheduling_policy": config.policy}
    return dataclasses.replace(
        base,
        layout=config.layout.text,
        max_num_seqs=config.knobs.max_num_seqs,
        max_num_batched_tokens=config.knobs.max_num_batched_tokens,
        **devices,
        **policy,
    )


def gpu_list(count: int) -> str:
    return ",".join(f"cuda:{i}" for i in range(count))


class Evaluator:
    def __init__(
        self, sim_args: argparse.Namespace, engine_args: EngineArgs, arrival: ArrivalSpec, budget: int
    ) -> None:
        """`sim_args`: `epd simulate`'s namespace (workload, SLOs, costs); `arrival`: its process,
        whose rate each simulation sets; `budget`: simulations at most."""
        self.sim_args, self.engine_args, self.arrival = sim_args, engine_args, arrival
        self.budget, self.spent = budget, 0
        self.processor = SizedImageProcessor.from_pretrained(engine_args.model)
        self._specs: dict[Config, SimulateSpec] = {}

    @property
    def exhausted(self) -> bool:
        return self.spent >= self.budget

    def spec(self, config: Config, rate: float) -> SimulateSpec:
        """The simulation of `config` at `rate`, with a fresh role timer around its costs."""
        base = self._specs.get(config)
        if base is None:
            base = self._specs[config] = simulate_spec(
                self.sim_args, engine_args_for(self.engine_args, config)
            )
        bench = dataclasses.replace(base.bench, arrivals=(dataclasses.replace(self.arrival, rate=rate),))
        cluster = dataclasses.replace(base.cluster, costs=RoleTimer(base.cluster.costs))
        return dataclasses.replace(base, bench=bench, cluster=cluster)

    def costs_record(self) -> dict:
        """Where the costs came from: the profile (path, sha256, meta), or the linear costs."""
        spec = next(iter(self._specs.values()), None)
        if spec is None:
            return {}
        costs = spec.cluster.costs
        linear = (
            dataclasses.asdict(costs) if spec.profile is None and dataclasses.is_dataclass(costs) else None
        )
        return {"profile": spec.profile, "linear": linear, "connector": spec.connector}

    def workload(self, config: Config) -> tuple[ComputeCosts, list[SimRequest]]:
        """The cost model and the requests every simulation serves (as `config`'s router takes them)."""
        spec = self.spec(config, 1.0)
        costs = spec.cluster.costs.costs  # type: ignore[attr-defined]  # inside the role timer
        router = SimCluster(spec.cluster, cost_model_compute(costs)).router
        run = bench_run(spec.bench, 0, self.processor, router.max_model_len, spec.tokenizer_dir)
        return costs, list(run.requests.values())

    def run(self, config: Config, rate: float) -> Trial | None:
        """Simulate `config` at `rate`; None once the budget is spent."""
        if self.exhausted:
            return None
        self.spent += 1
        spec = self.spec(config, rate)
        record, _ = simulate_rate(spec, 0, self.processor)
        summary = record["summary"]
        timer: RoleTimer = spec.cluster.costs  # type: ignore[assignment]
        ttft, tpot = summary["ttft"]["p90"], summary["tpot"]["p90"]
        return Trial(
            rate,
            summary["slo_attainment"] or 0.0,
            ttft,
            tpot,
            summary["e2e"]["p50"],
            summary["completed"],
            timer.busy_shares(config.layout, summary["duration_s"]),
            max(_share(ttft, self.sim_args.slo_ttft), _share(tpot, self.sim_args.slo_tpot)),
        )


def _share(value: float | None, objective: float | None) -> float:
    """`value` as a share of its objective: 0 without an objective, inf without a value."""
    if objective is None:
        return 0.0
    return math.inf if value is None else value / objective
