"""`--role-switching auto` in the simulator: a two-phase workload (prefill-heavy, then decode-heavy)
on the real router, switches and instance cores, scored by the planner's simulator.

The compute is scripted (epd.engine.scripted_runner): every token depends on the prompt, the image
embeddings and the KV that reached the instance, so a switch that lost or mixed anything would
change the outputs. They must be the ones of the same requests on the layout that never switches.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from epd.cluster.router.auto_roles import AutoRolesConfig, RoleSwitchingOptions
from epd.sim import ClusterSpec, LinearCosts, SimCluster, Workload, engine_config, make_requests, simulate
from epd.sim.harness import SimResult
from epd.sim.workload import SimRequest

LAYOUT = "1E+2P+1D"
# Decoding is expensive per sequence (reading its KV), prefill cheap per token: the first phase
# needs little decode capacity, the second more than one D gives.
COSTS = LinearCosts(step_s=2e-3, token_s=100e-6, sequence_s=1.5e-3)
AUTO = RoleSwitchingOptions(
    AutoRolesConfig(dwell_s=5.0, window_s=2.0, max_requests=24, min_requests=8, trigger_s=0.05)
)


def two_phases(model: str) -> tuple[list[SimRequest], float]:
    """60 requests with images and long prompts, 2 tokens each; then 60 short text prompts with 48
    tokens each, at the same rate. Returns the requests and when the second phase begins."""
    shape = engine_config(model).model
    first = make_requests(
        Workload(60, 30.0, seed=1, max_images=2, prompt_tokens=(200, 400), output_tokens=(2, 2)), shape
    )
    second = make_requests(
        Workload(60, 30.0, seed=2, max_images=0, prompt_tokens=(8, 16), output_tokens=(48, 48)), shape
    )
    boundary = first[-1].arrival_time
    later = [
        dataclasses.replace(r, request_id=f"b{r.request_id}", arrival_time=boundary + r.arrival_time)
        for r in second
    ]
    requests = [
        dataclasses.replace(r, params=dataclasses.replace(r.params, ignore_eos=True)) for r in first + later
    ]
    return requests, boundary


def run(model: str, requests: list[SimRequest], role_switching: RoleSwitchingOptions | None) -> SimResult:
    spec = ClusterSpec(LAYOUT, engine_config(model), COSTS, role_switching=role_switching)
    return simulate(SimCluster(spec), requests)


def mean_latency(result: SimResult) -> float:
    latencies = [o.metrics.finished_time - o.metrics.arrival_time for o in result.outputs.values()]
    return sum(latencies) / len(latencies)


@pytest.fixture(scope="module")
def model(tmp_path_factory: pytest.TempPathFactory) -> str:
    from epd.testing.checkpoints import build_tiny_checkpoint

    return str(build_tiny_checkpoint(Path(tmp_path_factory.mktemp("ckpt")) / "qwen2_5_vl", "qwen2_5_vl"))


def test_auto_switches_once_after_the_phase_boundary_and_keeps_every_token(model: str):
    requests, boundary = two_phases(model)
    fixed = run(model, requests, None)
    auto = run(model, requests, AUTO)

    assert fixed.switches == [] and fixed.leftovers == [] and auto.leftovers == []
    [switch] = auto.switches
    assert (switch["trigger"], switch["reason"], switch["state"]) == ("auto", "decode", "done")
    assert switch["from"] == "P" and "D" in switch["to"], "a prefill instance takes decodes"
    ended = auto.end_time  # a switch record says how long it took, not when: its SetRoles in the log does
    switched_at = next(e.time for e in auto.log.entries if e.kind == "message" and e.what == "SetRoles")
    assert boundary < switched_at < boundary + 1.5 < ended, "soon after the decode-heavy phase began"
    assert sorted(auto.outputs) == sorted(fixed.outputs) == sorted(r.request_id for r in requests)
    for rid, out in fixed.outputs.items():
        assert auto.outputs[rid].outputs[0].token_ids == out.outputs[0].token_ids, rid
    assert mean_latency(auto) < 0.8 * mean_latency(fixed), "the switch paid off"


def test_a_steady_single_phase_load_does_not_switch(model: str):
    requests, boundary = two_phases(model)
    first_phase = [r for r in requests if r.arrival_time <= boundary]
    result = run(model, first_phase, AUTO)
    assert result.switches == [] and len(result.outputs) == len(first_phase)


def test_epd_simulate_takes_role_switching_auto(simulate, quick: list[str]):
    doc = simulate("--layout", "1E+2P+1D", "--rates", "8", "--role-switching", "auto", *quick)
    simulation = doc["simulation"]
    assert simulation["serve_options"]["role_switching"] == "auto"
    [run] = simulation["runs"]
    assert run["leftovers"] == [] and isinstance(run["role_switches"], list)
    assert all(s["trigger"] == "auto" for s in run["role_switches"])
