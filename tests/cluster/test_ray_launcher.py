"""The Ray launcher on a local Ray cluster of three nodes (ray.cluster_utils): layouts placed by
node label, one group per node, over tcp, give 1EPD's tokens; a node removed while serving costs
no request (the router re-places the work of its instances); shutdown leaves no actor behind.

Skipped where Ray is not installed (it is an optional extra: `pip install 'epd[ray]'`).
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import pytest

ray = pytest.importorskip("ray")
from ray.cluster_utils import Cluster as RayCluster  # noqa: E402

from epd import LLM, SamplingParams  # noqa: E402
from epd.cluster.layout import Layout  # noqa: E402
from epd.cluster.ray_launcher import GROUP_LABEL, RayLauncher, local_gpu_index  # noqa: E402

sys.path.insert(0, str(Path(__file__).parent))
from test_disaggregation import mixed_requests  # noqa: E402

NODES = ("a", "b", "c")  # a is the head: it cannot be removed
PARAMS = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
NODE_ARGS = {"num_cpus": 2, "object_store_memory": 100 << 20, "include_dashboard": False}
DEADLINE_S = 120.0


@pytest.fixture(scope="module")
def ray_cluster():
    cluster = RayCluster(
        initialize_head=True, connect=True, head_node_args={**NODE_ARGS, "labels": {GROUP_LABEL: "a"}}
    )
    try:
        nodes = {"a": cluster.head_node}
        for name in NODES[1:]:
            nodes[name] = cluster.add_node(**NODE_ARGS, labels={GROUP_LABEL: name})
        cluster.wait_for_nodes()
        yield cluster, nodes
    finally:  # also when a test fails or is interrupted: no Ray process outlives the module
        ray.shutdown()
        cluster.shutdown()


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def requests():
    return mixed_requests(8, seed=5)


@pytest.fixture(scope="module")
def reference(model, requests):
    with LLM(model) as llm:
        return [o.outputs[0].token_ids for o in llm.generate(requests, PARAMS, use_tqdm=False)]


def alive_actors() -> list[dict]:
    return [a for a in ray._private.state.actors().values() if a["State"] != "DEAD"]


def test_actor_options_follow_the_layout(ray_cluster) -> None:
    launcher = RayLauncher()
    encoder, prefill, _ = Layout.parse("1E@b+1P+1D").instances("cuda:0,cuda:1,cuda:2")
    assert launcher.actor_options(encoder)["label_selector"] == {GROUP_LABEL: "b"}
    assert launcher.actor_options(encoder)["num_gpus"] == 1
    assert launcher.actor_options(prefill)["scheduling_strategy"] == "SPREAD"
    assert RayLauncher.multi_host and launcher.host  # the router binds where the nodes reach it
    # A GPU actor sees the node's GPUs (CUDA IPC, NCCL between actors) and picks Ray's by index.
    assert launcher.actor_options(encoder)["runtime_env"]["env_vars"]
    assert "runtime_env" not in launcher.actor_options(Layout.parse("1EPD").instances("cpu")[0])
    assert local_gpu_index(3, None) == 3 and local_gpu_index("6", "4,6,7") == 1


@pytest.mark.parametrize("transfer", ["tcp", "auto"])  # auto: chosen per pair (shm: one machine)
def test_one_instance_per_node_gives_1epd_tokens(ray_cluster, model, requests, reference, transfer) -> None:
    layout = "1E@a+1P@b+1D@c"
    with LLM(model, layout=layout, launcher="ray", transfer=transfer) as llm:
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
        assert len(alive_actors()) == 3
    assert [o.error for o in outputs] == [None] * len(outputs)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert alive_actors() == []


def test_a_node_removed_while_serving_costs_no_request(ray_cluster, model, requests, reference) -> None:
    cluster, nodes = ray_cluster
    layout = "1E@a+1E@b+1P@c+1D@a+1D@b"  # 2E+1P+2D; node b holds E1 and D1
    with LLM(model, layout=layout, launcher="ray", transfer="tcp", instance_silence_timeout=3.0) as llm:
        engine = llm.engine
        for i, prompt in enumerate(requests):
            engine.add_request(str(i), engine.prepare_images(llm.processor.process_prompt(prompt)), PARAMS)
        finished, removed, unfinished_at_removal = {}, False, 0
        deadline = time.monotonic() + DEADLINE_S
        while len(finished) < len(requests):
            assert time.monotonic() < deadline, f"{len(finished)} of {len(requests)} finished"
            for out in engine.step():
                # Once tokens flow (decodes under way on D0 and D1), node b goes.
                if not removed and out.outputs and out.outputs[0].token_ids:
                    cluster.remove_node(nodes["b"], allow_graceful=False)
                    removed, unfinished_at_removal = True, len(requests) - len(finished)
                if out.finished:
                    finished[out.request_id] = out
        assert removed and unfinished_at_removal
        while engine.instances_up()["E1"] or engine.instances_up()["D1"]:  # the router saw them go
            assert time.monotonic() < deadline, f"node b's instances still up: {engine.instances_up()}"
            engine.poll_idle()
            time.sleep(0.05)
    outputs = [finished[str(i)] for i in range(len(requests))]
    assert [o.error for o in outputs] == [None] * len(outputs)
    assert [o.outputs[0].token_ids for o in outputs] == reference
    assert alive_actors() == []  # the restarts that could not be placed (no node b) were killed too
