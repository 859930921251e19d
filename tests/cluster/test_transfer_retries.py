"""Failed transfers between live instances: retried on the same pair, then re-placed, never a hang.

Instance processes with real shm connectors, under which `FlakyBackend` (flaky_transfer.py) fails the
sends its rules pick; the retries above it (epd.transfer.retry) are the production ones.

| request  | what is dropped                               | outcome                                 |
|----------|-----------------------------------------------|-----------------------------------------|
| retried  | P0's KV sends of it, twice each               | retried, the undisturbed tokens         |
| image    | E0's embedding sends, twice each              | retried, the undisturbed tokens         |
| replaced | P0's KV sends of its first attempt, always    | given up, placed anew: the same tokens  |
| doomed   | P0's KV sends of it, always; one attempt      | fails with the transfer's error         |
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flaky_transfer import Drop, FlakyLauncher

from epd import LLM, SamplingParams
from epd.cluster.cluster import Cluster
from epd.cluster.layout import Layout
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.server.metrics import ServerMetrics
from epd.testing.images import noise_image
from epd.transfer.retry import GAVE_UP

WAIT_S = 120.0  # a bound on each wait for a state, never a guess at how long work takes
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PAD = "<|vision_start|><|image_pad|><|vision_end|>"
PROMPTS = {
    "retried": "a request whose KV fails twice",
    "image": {"prompt": f"{PAD}Describe it.", "multi_modal_data": {"image": [noise_image(56, 56, seed=3)]}},
    "replaced": "a request whose first P -> D pair is broken",
}


def drops(kv_streaming: str) -> list[Drop]:
    # By layer, only the layers fail: the hand-off behind them arrives before their retries.
    kv = "kvl:" if kv_streaming == "layer" else "kv:"
    return [
        Drop("P0", kv, request="retried", times=2),
        Drop("P0", kv, request="replaced", first_attempt_only=True),
        Drop("P0", kv, request="doomed"),
        Drop("E0", "mm:", times=2),
    ]


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def expected(model) -> dict[str, list[int]]:
    with LLM(model, layout="1EPD", max_model_len=1024) as reference:
        outs = reference.generate(list(PROMPTS.values()), PARAMS, use_tqdm=False)
    return {rid: out.outputs[0].token_ids for rid, out in zip(PROMPTS, outs)}


def run_until(cluster: Cluster, done: Callable[[], bool], what: str, outputs: dict | None = None) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"{what} not within {WAIT_S} s: a hang"
        finished = {o.request_id: o for o in cluster.step() if o.finished}
        if outputs is not None:
            outputs.update(finished)


@pytest.mark.parametrize("kv_streaming", ["request", "layer"])
def test_failed_transfers_are_retried_then_placed_anew_and_never_hang(model, expected, kv_streaming):
    config = EngineArgs(model=model, max_model_len=1024).engine_config()
    layers = config.model.hf.text.num_hidden_layers
    launcher = FlakyLauncher(drops(kv_streaming))
    cluster = Cluster(
        Layout.parse("1E+1P+1D"), config, transfer="shm", kv_streaming=kv_streaming, launcher=launcher
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
        assert cluster.router.stats["retries"] == 1, "only `replaced` was placed anew"

        # P0 counted its retries (2 per key of `retried` and of `replaced`'s first attempt), and
        # gave up on `replaced`'s keys; D0 holds nothing of the attempt it was left with.
        keys = layers if kv_streaming == "layer" else 1
        stats = cluster.instance_stats
        counts = {"transfer_retries_total": 4 * keys, "transfer_gave_up_total": keys}
        run_until(cluster, lambda: counts.items() <= stats().get("P0", {}).items(), "P0's counts")
        # Instances report every STATS_INTERVAL_S: the report read first may predate the last
        # hand-off, so wait for one that shows D0 holding nothing (a leak fails this wait).
        holds = ("kv_handoffs_awaiting_layers", "kv_parts_buffered")
        run_until(
            cluster, lambda: all(stats().get("D0", {}).get(k) == 0 for k in holds), "D0 holding nothing"
        )
        metrics = ServerMetrics(stats, cluster.instances_up, lambda: 0).render().decode()
        assert f'epd_instance_transfer_retries_total{{instance="P0"}} {4.0 * keys}' in metrics
        assert f'epd_instance_transfer_gave_up_total{{instance="P0"}} {float(keys)}' in metrics

        # One attempt allowed: the failure after the last retry ends the request, with its error.
        cluster.router.core.max_attempts = 1
        cluster.add_request("doomed", processor.process_prompt("a request no pair can carry"), PARAMS)
        outputs.clear()
        run_until(cluster, lambda: "doomed" in outputs, "the end of `doomed`", outputs)
        error = outputs["doomed"].error
        assert error is not None and f"{GAVE_UP} 3 attempts" in error and error.startswith("P0: "), error
        assert not cluster.has_unfinished_requests()
    finally:
        cluster.shutdown()
