"""Layer-wise KV streaming (kv_streaming="layer"): same tokens as the aggregated engine, and no
layer parts left on the decode instance, also for requests that end at their first token.

The layouts run as real processes over shm, on the requests and reference of
test_disaggregation; the engine-level test checks what the per-layer hook sends in-process.
"""

from __future__ import annotations

import time

import pytest
import torch
from test_disaggregation import PARAMS, assert_same, mixed_requests

from epd import LLM, SamplingParams
from epd.cluster.kv_handoff import KVParts
from epd.engine.llm_engine import LLMEngine
from epd.engine.request import Request
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.lifetime import Event
from epd.models.config import VLModelConfig
from epd.transfer.base import Received

# The tiny qwen2_5_vl checkpoint's greedy first token after this prompt is an EOS token.
EOS_PROMPT = {"prompt_token_ids": [*range(10, 30), 7, 8]}


@pytest.fixture(scope="module")
def model(checkpoints):
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def num_layers(model) -> int:
    return VLModelConfig.from_pretrained(model).text.num_hidden_layers


@pytest.fixture(scope="module")
def requests():
    return mixed_requests(32, seed=1)


@pytest.fixture(scope="module")
def reference(model, requests):
    with LLM(model) as llm:
        return llm.generate(requests, PARAMS, use_tqdm=False)


@pytest.fixture(scope="module")
def split(model):
    with LLM(model, layout="1E+1P+1D", transfer="shm", kv_streaming="layer") as llm:
        yield llm


# ---- in one process: what the engine streams ------------------------------------------------------


class RecordingSink:
    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def send_layer(self, request: Request, layer: int, kv: torch.Tensor) -> None:
        self.calls.append(("layer", request.request_id, layer, kv.clone()))

    def discard(self, request: Request) -> None:
        self.calls.append(("discard", request.request_id))


def test_engine_streams_each_layer_as_the_cache_holds_it(model, num_layers):
    processor = InputProcessor.from_pretrained(model)
    sink, handed = RecordingSink(), {}

    def handoff(req: Request, kv: torch.Tensor | None) -> None:
        # The blocks are still held here: the cache after the whole forward, for comparison.
        table = engine.block_manager.block_table(req.request_id)
        handed[req.request_id] = (kv, engine.runner.gather_kv(table, req.num_computed_tokens))

    config = EngineArgs(model=model, block_size=4).engine_config()
    engine = LLMEngine(config, processor.tokenizer, handoff=handoff, layer_sink=sink)

    def add(rid: str, prompt: dict, max_tokens: int = 4, ignore_eos: bool = True) -> None:
        params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=ignore_eos)
        engine.add_request(rid, processor.process_prompt(prompt), params)

    add("a", {"prompt_token_ids": list(range(10, 41))})
    engine.step()
    # "b" and "c" share a prefix with "a" (prefix-cache hits); "c" and "d" end at their first token.
    add("b", {"prompt_token_ids": [*range(10, 30), 9, 9]})
    add("c", EOS_PROMPT, ignore_eos=False)
    add("d", {"prompt_token_ids": [5, 6, 7]}, max_tokens=1)
    engine.step()
    assert not engine.has_unfinished_requests()
    assert engine.block_manager.prefix_hit_tokens > 0

    layers = {rid: [c[3] for c in sink.calls if c[:2] == ("layer", rid)] for rid in "abcd"}
    assert [c[2] for c in sink.calls if c[:2] == ("layer", "b")] == list(range(num_layers))
    assert all(len(layers[rid]) == num_layers for rid in "cd")
    assert sink.calls[-2:] == [("discard", "c"), ("discard", "d")]  # after every layer was sent
    assert handed.keys() == {"a", "b"}
    for rid in "ab":
        kv, cache = handed[rid]
        assert kv is None  # streamed: the hand-off carries no KV
        assert torch.equal(torch.stack(layers[rid]), cache)


def received(key: str, meta: dict, **tensors: torch.Tensor) -> Received:
    return Received(key, tensors, meta, 0, 0.0)


def test_decode_side_assembles_complete_layers_and_refuses_missing_ones():
    parts, layer = KVParts(), [torch.full((2, 3, 1, 4), float(i)) for i in range(3)]
    for i in (2, 0, 1):  # any arrival order
        parts.add(received(f"kvl:r:{i}", {"request_id": "r", "layer": i}, kv=layer[i]))
    parts.add(received("kvl:s:0", {"request_id": "s", "layer": 0}, kv=layer[0]))
    assert parts.stats() == {"kv_parts_buffered": 4, "kv_parts_received_total": 4}

    kv = parts.complete(received("kv:r", {"request_id": "r", "streamed_layers": 3}))
    assert torch.equal(kv, torch.stack(layer))
    with pytest.raises(ValueError, match="1 of 3 KV parts arrived"):
        parts.complete(received("kv:s", {"request_id": "s", "streamed_layers": 3}))
    assert parts.stats()["kv_parts_buffered"] == 0  # freed either way
    assert parts.complete(received("kv:t", {"request_id": "t"}, kv=layer[0])) is layer[0]  # sent whole


# ---- real processes -------------------------------------------------------------------------------


def test_split_layout_streams_layers_and_matches_aggregated(split, requests, reference):
    outputs = split.generate(requests, PARAMS, use_tqdm=False)
    assert_same(outputs, reference)
    for out in outputs:
        ends = [e for e in out.metrics.events if e.event is Event.KV_TRANSFER_END]
        assert [e.instance for e in ends] == ["D0"]
        assert "kv_transfer" in out.metrics.breakdown()


def test_colocated_encode_layout_streams_layers_and_matches_aggregated(model, requests, reference):
    with LLM(model, layout="2EP+1D", transfer="shm", kv_streaming="layer") as llm:
        outputs = llm.generate(requests, PARAMS, use_tqdm=False)
    assert_same(outputs, reference)


def next_decode_stats(llm: LLM, deadline: float) -> dict[str, float]:
    """D0's next stats report: sent after everything D0 told the router before this call (one socket)."""
    router = llm.engine.router
    router.poll(0)
    last = router.instance_stats.get("D0")
    while router.instance_stats.get("D0") is last:
        if time.monotonic() > deadline:
            pytest.fail("no stats report from D0")
        router.poll(100)
    return router.instance_stats["D0"]


def test_first_token_endings_leave_no_parts_on_decode(split, requests, reference, num_layers):
    deadline = time.monotonic() + 20
    before = next_decode_stats(split, deadline)["kv_parts_received_total"]
    at_length = SamplingParams(temperature=0, max_tokens=1)
    outputs = split.generate([requests[0], EOS_PROMPT], [at_length, PARAMS], use_tqdm=False)
    assert all(o.error is None and len(o.outputs[0].token_ids) == 1 for o in outputs)
    assert outputs[0].outputs[0].token_ids == reference[0].outputs[0].token_ids[:1]
    assert [o.outputs[0].finish_reason for o in outputs] == ["length", "stop"]
    assert outputs[1].outputs[0].stop_reason is None  # EOS, not a stop token

    # P reported the finish; its discard notices reach D0 on their own: wait for D0 to see them.
    stats = next_decode_stats(split, deadline)
    while stats["kv_parts_received_total"] < before + 2 * num_layers or stats["kv_parts_buffered"]:
        stats = next_decode_stats(split, deadline)
    assert stats["kv_parts_received_total"] == before + 2 * num_layers  # both were streamed ...
    assert stats["kv_parts_buffered"] == 0  # ... and dropped on P's word
    # The decode instance still serves: a follow-up request completes as in the aggregated engine.
    assert_same(split.generate([requests[1]], PARAMS, use_tqdm=False), [reference[1]])
