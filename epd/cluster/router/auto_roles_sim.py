"""Scoring a layout for the role-switching policy on the planner's simulator (epd.sim).

    the recent requests (auto_load.RecentRequest), images swapped for size-only stand-ins
    -> a fresh SimCluster of the candidate layout (the real router and instance cores on virtual
       time, the cost-model runner: epd.sim.runner), same engine limits, costs and links as served
    -> their arrivals replayed with their real gaps -> SLO attainment and mean latency (auto_roles.Score)

A simulation starts empty: it predicts how the layout serves the recent mix of requests, not how
fast it works off today's backlog (the estimator's drain times say that, and trigger the look).
Its size is the policy's `max_requests`; a few hundred milliseconds on a CPU for tens of requests
of hundreds of tokens, off the router's thread (auto_driver.py).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

from epd.cluster.router.auto_load import ClusterView, RecentRequest, UnitCosts
from epd.cluster.router.auto_roles import AutoRoles, RoleSwitchingOptions, Score
from epd.config import EngineConfig
from epd.engine.scripted_runner import ComputeCosts
from epd.inputs.types import ImageInput, ProcessedPrompt
from epd.outputs import RequestOutput
from epd.sim.cluster import ClusterSpec, SimCluster
from epd.sim.harness import simulate
from epd.sim.images import standin_patches
from epd.sim.runner import cost_model_compute
from epd.sim.workload import SimRequest


@dataclass(frozen=True)
class SLOTargets:
    ttft_s: float | None = None
    tpot_s: float | None = None

    def met(self, out: RequestOutput) -> bool:
        m = out.metrics
        if out.error is not None or m.finished_time is None:
            return False
        first = m.first_token_time if m.first_token_time is not None else m.finished_time
        ttft, tokens = first - m.arrival_time, len(out.outputs[0].token_ids) if out.outputs else 0
        tpot = (m.finished_time - first) / (tokens - 1) if tokens > 1 else 0.0
        return (self.ttft_s is None or ttft <= self.ttft_s) and (self.tpot_s is None or tpot <= self.tpot_s)


class SimScorer:
    """`Scorer` (auto_roles.py) on the simulator: `base` gives everything but the layout."""

    def __init__(self, base: ClusterSpec, slo: SLOTargets) -> None:
        self.base, self.slo = base, slo

    def score(self, layout: tuple[str, ...], view: ClusterView) -> Score:
        requests = replayed(view.recent)
        spec = dataclasses.replace(self.base, layout=layout_text(layout), role_switching=None)
        with _quiet(QUIET_LOGGERS):  # every simulated instance would log that it is ready
            cluster = SimCluster(spec, cost_model_compute)  # each instance priced at its degree
            result = simulate(cluster, requests)
        outputs = [result.outputs.get(r.request_id) for r in requests]
        done = [out for out in outputs if out is not None]
        if not done:
            return Score(0.0, float("inf"))
        met = sum(self.slo.met(out) for out in done)
        latency = [out.metrics.finished_time - out.metrics.arrival_time for out in done]
        return Score(met / len(requests), sum(latency) / len(latency))


QUIET_LOGGERS = ("epd.engine.llm_engine", "epd.cluster.instance.core")


@contextlib.contextmanager
def _quiet(names: Sequence[str]) -> Iterator[None]:
    loggers = [logging.getLogger(name) for name in names]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        for logger, level in zip(loggers, levels):
            logger.setLevel(level)


def layout_text(layout: Sequence[str]) -> str:
    """('P', 'D', 'D') -> '1P+2D': one group per role set (an EP group before a D group, as written)."""
    counts: dict[str, int] = {}
    for roles in layout:
        counts[roles] = counts.get(roles, 0) + 1
    return "+".join(f"{n}{roles}" for roles, n in counts.items())


def replayed(recent: Sequence[RecentRequest]) -> list[SimRequest]:
    """The recent requests from time 0, with their gaps; images as stand-ins (epd.sim.images)."""
    if not recent:
        return []
    start = recent[0].arrival
    return [
        SimRequest(f"r{i:05d}", r.arrival - start, standin_prompt(r.prompt), r.params)
        for i, r in enumerate(recent)
    ]


def standin_prompt(prompt: ProcessedPrompt) -> ProcessedPrompt:
    """The same tokens and placeholders; each image only its grid, key and 3 bytes per patch."""
    images = [_standin(image) for image in prompt.images]
    return dataclasses.replace(prompt, images=images)


def _standin(image: ImageInput) -> ImageInput:
    key = hashlib.sha256(image.content_hash.encode()).hexdigest()
    return ImageInput(
        torch.empty(0), image.grid_thw, image.content_hash, raw_patches=standin_patches(key, image.grid_thw)
    )


@dataclass(frozen=True)
class ScoringSetup:
    scorer: SimScorer
    units: UnitCosts
    calibrate: bool  # no measured costs: the estimator takes per-token seconds from the instances' stats


def sim_setup(
    engine: EngineConfig,
    *,
    layout: str,
    profile: str | None,
    transfer: str,
    mm_cache_bytes: int,
    kv_streaming: str,
    slo: SLOTargets,
    costs: ComputeCosts | None = None,
    link: tuple[float, float] | None = None,
    devices: Sequence[str] = (),
) -> ScoringSetup:
    """The simulator as `epd simulate` sets it up for these serve options (epd.sim.command):
    the profile's costs and links for `transfer`, else `costs` (given: the simulation's own) or
    the linear defaults with free links."""
    from epd.sim.command import MM_BLOCK_SIZE, cost_source, sim_engine_config
    from epd.sim.model_shape import narrow_mm_cache_bytes
    from epd.sim.wire import ModelWireBytes

    measured = profile is not None or costs is not None  # else linear defaults: calibrate from stats
    if profile is not None or costs is None:
        source = cost_source(profile, None, transfer)
        costs, link = source.compute, source.link
    latency, bandwidth = link or (0.0, float("inf"))
    base = ClusterSpec(
        layout,
        sim_engine_config(engine, devices),
        costs,
        transfer_latency_s=latency,
        transfer_bandwidth=bandwidth,
        wire_bytes=ModelWireBytes.of(engine.model),
        mm_cache_bytes=narrow_mm_cache_bytes(engine.model, mm_cache_bytes, MM_BLOCK_SIZE),
        kv_streaming=kv_streaming,
    )
    return ScoringSetup(SimScorer(base, slo), UnitCosts.from_costs(costs), calibrate=not measured)


def auto_policy(
    options: RoleSwitchingOptions,
    engine: EngineConfig,
    *,
    layout: str,
    transfer: str,
    mm_cache_bytes: int,
    kv_streaming: str,
    costs: ComputeCosts | None = None,
    link: tuple[float, float] | None = None,
    devices: Sequence[str] = (),
) -> AutoRoles:
    """The policy `--role-switching auto` runs, its scorer the simulator set up as served."""
    setup = sim_setup(
        engine,
        layout=layout,
        profile=options.profile,
        transfer=transfer,
        mm_cache_bytes=mm_cache_bytes,
        kv_streaming=kv_streaming,
        slo=SLOTargets(options.slo_ttft_s, options.slo_tpot_s),
        costs=costs,
        link=link,
        devices=devices,
    )
    return AutoRoles(options.config, setup.scorer, setup.units, calibrate=setup.calibrate)


def simulated_policy(options: RoleSwitchingOptions, spec: ClusterSpec) -> AutoRoles:
    """The policy inside `epd simulate` (epd.sim.cluster): it predicts with the simulation's own
    costs and links, on clusters like the one it runs in (which do not switch themselves)."""
    base = dataclasses.replace(spec, role_switching=None)
    slo = SLOTargets(options.slo_ttft_s, options.slo_tpot_s)
    return AutoRoles(options.config, SimScorer(base, slo), UnitCosts.from_costs(spec.costs))
