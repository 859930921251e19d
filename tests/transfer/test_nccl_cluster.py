"""The nccl connector's pair logic inside a real cluster, on CPU: `transfer="gloo"` (the same code
over host memory) moves embeddings and KV, whole and layer by layer, between instance processes,
and every layout gives the tokens and logprobs of the in-process 1EPD engine, also when an
instance dies mid-decode."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from epd import LLM, SamplingParams

sys.path.insert(0, str(Path(__file__).parents[1] / "cluster"))
from test_disaggregation import assert_same, mixed_requests  # noqa: E402

PARAMS = SamplingParams(temperature=0, max_tokens=8, logprobs=2)


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def requests():
    return mixed_requests(12, seed=4)


@pytest.fixture(scope="module")
def reference(model, requests):
    with LLM(model) as llm:
        return llm.generate(requests, PARAMS, use_tqdm=False)


@pytest.mark.parametrize(("layout", "kv_streaming"), [("1E+1P+1D", "request"), ("2E+1P+1D", "layer")])
def test_layouts_over_gloo_pairs_match_aggregated(model, requests, reference, layout, kv_streaming):
    with LLM(model, layout=layout, transfer="gloo", kv_streaming=kv_streaming) as llm:
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
    assert_same(outputs, reference)


def test_a_decode_instance_killed_mid_decode_costs_no_request(model):
    """P's gloo pair with D1 breaks when D1 is SIGKILLed: D1's requests are prefilled again and go
    on on D0 through P's other pair; every request ends with the tokens of an undisturbed run."""
    params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
    prompts = [f"request number {i}" for i in range(6)]
    with LLM(model, max_model_len=1024) as reference:
        expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    with LLM(model, layout="1E+1P+2D", transfer="gloo", max_model_len=1024) as llm:
        cluster = llm.engine
        for i, prompt in enumerate(prompts):
            cluster.add_request(str(i), llm.processor.process_prompt(prompt), params)
        on_victim = {rid for rid, s in cluster.router.requests.items() if s.decode == "D1"}
        assert on_victim
        outputs, deadline = {}, time.monotonic() + 60
        while not all(len(s.token_ids) > 3 for s in cluster.router.requests.values()):
            assert time.monotonic() < deadline, "decoding did not start everywhere"
            outputs.update({o.request_id: o for o in cluster.step() if o.finished})
        os.kill(cluster.router.instances["D1"].ready.pid, signal.SIGKILL)
        while len(outputs) < len(prompts):
            assert time.monotonic() < deadline + 60, "a request hung after D1 died"
            outputs.update({o.request_id: o for o in cluster.step() if o.finished})
        assert cluster.instance_stats()["D1"]["requests_continue_total"] == len(on_victim)
    for i in range(len(prompts)):
        out = outputs[str(i)]
        assert out.error is None and out.outputs[0].token_ids == expected[i], (i, out.error)
