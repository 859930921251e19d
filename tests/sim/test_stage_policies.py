"""--scheduling-policy per stage (encode=slo,prefill=fcfs,decode=slo): parsed with clear errors, and
each stage of a simulated cluster serving its queue in its own order."""

from __future__ import annotations

from dataclasses import replace

import pytest

from epd.cli import main
from epd.cluster.router.placement import LeastLoaded, MostSlack
from epd.config import EngineConfig, SchedulerConfig
from epd.engine.queue_policy import StagePolicies
from epd.inputs.image_processor import ImageProcessorConfig
from epd.sampling_params import SamplingParams
from epd.sim import ClusterSpec, LinearCosts, SimCluster, SimRequest, SimResult, engine_config, simulate
from epd.sim.workload import Workload, _PromptShaper, image_pool

# ---- parsing --------------------------------------------------------------------------------------


def test_the_plain_form_means_every_stage_and_a_stage_not_named_keeps_fcfs():
    assert StagePolicies.parse("slo") == StagePolicies("slo", "slo", "slo")
    assert StagePolicies.parse(" encode=slo, decode=priority ") == StagePolicies("slo", "fcfs", "priority")
    assert StagePolicies.parse("encode=slo,prefill=slo,decode=slo").text == "slo"
    assert StagePolicies.parse("prefill=slo").text == "encode=fcfs,prefill=slo,decode=fcfs"


@pytest.mark.parametrize(
    ("text", "says"),
    [
        ("edf", "unknown scheduling policy 'edf' for every stage"),
        ("encoder=slo", "unknown stage 'encoder'"),
        ("encode=edf", "unknown scheduling policy 'edf' for encode"),
        ("encode=slo,encode=fcfs", "stage 'encode' named twice"),
        ("encode=slo,", "unknown stage ''"),
    ],
)
def test_bad_stage_or_policy_names_are_refused_by_name(text: str, says: str):
    with pytest.raises(ValueError, match=says):
        StagePolicies.parse(text)
    with pytest.raises(ValueError, match=says):
        SchedulerConfig(scheduling_policy=text)


def test_a_queue_that_names_no_stage_gets_the_policy_only_when_every_stage_agrees():
    assert SchedulerConfig(scheduling_policy="slo").queue_policy().name == "slo"
    mixed = SchedulerConfig(scheduling_policy="encode=slo")
    assert mixed.queue_policy("encode").name == "slo" and mixed.queue_policy("decode").name == "fcfs"
    with pytest.raises(ValueError, match="differs by stage"):
        mixed.queue_policy()


def test_the_command_line_refuses_a_bad_stage_before_anything_runs(capsys):
    with pytest.raises(SystemExit) as exit_:
        main(["simulate", "--scheduling-policy", "encoder=slo", "--num-requests", "1"])
    assert exit_.value.code == 2
    assert "unknown stage 'encoder'" in capsys.readouterr().err


# ---- in a simulation ------------------------------------------------------------------------------

# As tests/cluster/test_slo_scheduling.py: one encoder that encodes one image per batch at 1 ms a
# patch, so its queue is where the time goes; a 6-image request first, then two 1-image ones with a
# tight TTFT that only an encoder serving by deadline meets.
COSTS = LinearCosts(step_s=1e-3, token_s=1e-6, sequence_s=0.0, encode_s=2e-3, patch_s=1e-3)
PATCHES = 64


@pytest.fixture(scope="module")
def engine(checkpoints) -> EngineConfig:
    return engine_config(str(checkpoints["qwen2_5_vl"]))


@pytest.fixture(scope="module")
def burst(engine) -> list[SimRequest]:
    images = image_pool(
        Workload(image_pool=8, image_sides=(112,)), ImageProcessorConfig.from_pretrained(engine.model.model)
    )
    shaper = _PromptShaper(engine.model)

    def request(rid: str, at: float, image_ids: list[int], slo_ttft: float) -> SimRequest:
        prompt = shaper.prompt([1, 2, 3], [4, 5, 6, 7], [images[i] for i in image_ids])
        return SimRequest(rid, at, prompt, SamplingParams(temperature=0.0, max_tokens=2, slo_ttft=slo_ttft))

    return [
        request("big", 0.0, [0, 1, 2, 3, 4, 5], 2.0),
        request("small0", 0.001, [6], 0.2),
        request("small1", 0.002, [7], 0.2),
    ]


def run(engine: EngineConfig, requests: list[SimRequest], policy: str) -> tuple[SimCluster, SimResult]:
    config = replace(engine, scheduler=replace(engine.scheduler, scheduling_policy=policy))
    cluster = SimCluster(ClusterSpec("1E+1P+1D", config, costs=COSTS, max_encode_batch_patches=PATCHES))
    result = simulate(cluster, requests)
    assert len(result.outputs) == len(requests) and result.leftovers == []
    return cluster, result


def met(result: SimResult, requests: list[SimRequest]) -> set[str]:
    def ttft(rid: str) -> float:
        metrics = result.outputs[rid].metrics
        return metrics.first_token_time - metrics.arrival_time

    return {r.request_id for r in requests if ttft(r.request_id) <= r.params.slo_ttft}


def stage_policies(cluster: SimCluster) -> dict[str, str]:
    """Each instance's queue policy, as it was built from the config."""
    e, p, d = (cluster.by_name[name].core for name in ("E0", "P0", "D0"))
    return {
        "encode": e.encode.worker.queue_policy.name,
        "prefill": p.llm.engine.scheduler.queue_policy.name,
        "decode": d.llm.engine.scheduler.queue_policy.name,
    }


def test_each_stage_serves_its_queue_by_its_own_policy(engine, burst):
    cluster, result = run(engine, burst, "encode=slo,prefill=fcfs,decode=fcfs")
    assert stage_policies(cluster) == {"encode": "slo", "prefill": "fcfs", "decode": "fcfs"}
    assert isinstance(cluster.router.placement.prefill, LeastLoaded)
    assert met(result, burst) == {"big", "small0", "small1"}, "the encoder's queue is where it matters"

    cluster, result = run(engine, burst, "encode=fcfs,prefill=slo,decode=slo")
    assert stage_policies(cluster) == {"encode": "fcfs", "prefill": "slo", "decode": "slo"}
    assert isinstance(cluster.router.placement.prefill, MostSlack)
    assert met(result, burst) == {"big"}, "deadline order after the encoder comes too late"
