"""`transfer_retries` and `transfer_timeout` reach every instance's connector.

EngineArgs -> Cluster -> InstanceConfig -> the instance's connector (shell.make_connector). With
no retries a failed send is reported at once, still as given up: the router places a request whose
KV did not reach D anew, and has P ask again for embeddings that did not come.
"""

from __future__ import annotations

import time
import types
from collections.abc import Callable
from dataclasses import replace

import pytest
import torch
from flaky_transfer import Drop, FlakyLauncher

from epd import LLM, SamplingParams
from epd.cluster.cluster import Cluster
from epd.cluster.instance import InstanceConfig
from epd.cluster.instance.shell import make_connector
from epd.cluster.layout import Layout
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.testing.images import noise_image
from epd.transfer.retry import RetryingConnector

WAIT_S = 120.0  # a bound on each wait for a state, never a guess at how long work takes
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PAD = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = {
    "image": {"prompt": f"{PAD}Describe it.", "multi_modal_data": {"image": [noise_image(56, 56, seed=5)]}},
    "kv": "a request whose KV fails once",
}


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


def test_engine_args_pass_the_transfer_options_to_the_cluster(model, monkeypatch):
    import epd.cluster.cluster

    seen: dict = {}

    def cluster(*args, **kwargs):  # records the options; a cluster without shared image files
        seen.update(kwargs)
        return types.SimpleNamespace(shared_files=None)

    monkeypatch.setattr(epd.cluster.cluster, "Cluster", cluster)
    args = EngineArgs(
        model=model,
        layout="1E+1P+1D",
        transfer_retries=0,
        transfer_timeout=1.5,
        transfer_staging_bytes=1 << 20,
        shared_file_bytes=0,
    )
    args.build(InputProcessor.from_pretrained(model))
    assert seen["transfer_retries"] == 0 and seen["transfer_timeout_s"] == 1.5
    assert seen["transfer_staging_bytes"] == 1 << 20 and seen["shared_file_bytes"] == 0


def test_an_instances_connector_takes_its_retries_and_timeout(model):
    spec = Layout.parse("1E+1P+1D").instances("cpu")[0]
    engine = EngineArgs(model=model).engine_config()
    cfg = InstanceConfig(spec, engine, "inproc://no-router", "tcp")
    cfg = replace(cfg, transfer_retries=0, transfer_timeout_s=1.5)
    with make_connector(cfg, "tcp") as connector:
        assert isinstance(connector, RetryingConnector) and connector.retries == 0
        assert connector.inner._send_timeout_s == 1.5
    with make_connector(replace(cfg, transfer_retries=4), "local") as connector:  # takes no timeout
        assert connector.retries == 4 and connector.name == "local"
    if torch.cuda.is_available():  # a cuda_ipc sender stages its sends in the memory it is given
        gpu = replace(cfg, engine=replace(cfg.engine, device="cuda:0"), transfer_staging_bytes=1 << 20)
        with make_connector(gpu, "cuda_ipc") as connector:
            assert connector.inner._regions.capacity == 1 << 20


def run_until(cluster: Cluster, done: Callable[[], bool], what: str, outputs: dict) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"{what} not within {WAIT_S} s: a hang"
        outputs.update({o.request_id: o for o in cluster.step() if o.finished})


def test_a_cluster_without_retries_sends_nothing_again_and_still_recovers(model):
    with LLM(model, layout="1EPD", max_model_len=1024) as reference:
        outs = reference.generate(list(PROMPTS.values()), PARAMS, use_tqdm=False)
    expected = {rid: out.outputs[0].token_ids for rid, out in zip(PROMPTS, outs)}
    drops = [Drop("E0", "mm:", times=1), Drop("P0", "kv:", request="kv", first_attempt_only=True)]
    config = EngineArgs(model=model, max_model_len=1024).engine_config()
    layout = Layout.parse("1E+1P+1D")
    launcher = FlakyLauncher(drops)
    cluster = Cluster(
        layout, config, transfer="shm", kv_streaming="request", transfer_retries=0, launcher=launcher
    )
    try:
        processor = InputProcessor.from_pretrained(model)
        for rid, prompt in PROMPTS.items():
            cluster.add_request(rid, processor.process_prompt(prompt), PARAMS)
        outputs: dict = {}
        run_until(cluster, lambda: len(outputs) == len(PROMPTS), "every request's end", outputs)
        for rid in PROMPTS:
            assert outputs[rid].error is None, (rid, outputs[rid].error)
            assert outputs[rid].outputs[0].token_ids == expected[rid], rid
        assert cluster.router.stats["retries"] == 1, "`kv` was placed anew at its first failure"

        # Each failure given up at once: nothing was sent again on the same pair.
        stats = cluster.instance_stats
        counts = {"transfer_retries_total": 0.0, "transfer_gave_up_total": 1.0}
        both = ("E0", "P0")
        run_until(
            cluster,
            lambda: all(counts.items() <= stats().get(n, {}).items() for n in both),
            "counts",
            outputs,
        )
    finally:
        cluster.shutdown()
