"""What the simulator charges and sizes: real transfer bytes from stand-in tensors, MM caches that
hold as many tokens narrow as real, and linear cost overrides."""

from __future__ import annotations

import pytest
import torch

from epd.cli import default_model
from epd.clock import VirtualClock
from epd.config import ModelConfig
from epd.engine.mm_cache import MMCache
from epd.sim.costs import LinearCosts, parse_costs
from epd.sim.model_shape import narrow_mm_cache_bytes, narrow_model
from epd.sim.wire import ModelWireBytes
from epd.transfer.memory import MemoryNetwork


@pytest.fixture(scope="module")
def model() -> ModelConfig:
    return ModelConfig(default_model(), dtype="bfloat16")


def test_transfers_are_charged_the_real_models_bytes(model: ModelConfig):
    text = model.hf.text
    wire = ModelWireBytes.of(model)
    assert wire.embed_bytes_per_token == model.hf.vision.out_hidden_size * 2
    assert (
        wire.kv_bytes_per_token == text.num_hidden_layers * 2 * text.num_key_value_heads * text.head_dim * 2
    )
    narrow = torch.zeros(64, 4)  # a stand-in: 64 tokens of 4 columns
    assert wire("mm:abc", {"embeds": narrow}) == 64 * wire.embed_bytes_per_token
    kv = torch.zeros(1, 2, 30, 1, 1, dtype=torch.float64)  # the runners' KV: one number per token
    state = torch.zeros(16, dtype=torch.uint8)
    assert wire("kv:r1", {"kv": kv, "generator_state": state}) == 30 * wire.kv_bytes_per_token + 16
    assert wire("kvl:r1:0", {"kv": kv[0]}) == 30 * wire.kv_bytes_per_token
    assert wire("kv:r1", {}) == 0 and wire("other", {"t": state}) == 16


def test_the_network_charges_what_wire_bytes_says(model: ModelConfig):
    clock = VirtualClock()
    wire = ModelWireBytes.of(model)
    network = MemoryNetwork(latency_s=0.01, bandwidth_bytes_per_s=1e6, wire_bytes=wire)
    a, b = network.connector("a", clock), network.connector("b", clock)
    a.send(b.address, "mm:x", {"embeds": torch.zeros(100, 4)})
    [landed] = network.deliver_until(10.0)
    assert landed.nbytes == 100 * wire.embed_bytes_per_token
    assert landed.time == pytest.approx(0.01 + landed.nbytes / 1e6)


def test_narrow_mm_caches_hold_as_many_blocks(model: ModelConfig):
    narrow = narrow_model(model)
    assert narrow.hf.text.hidden_size == narrow.hf.vision.out_hidden_size == model.hf.text.num_attention_heads
    assert (narrow.hf.text.vocab_size, narrow.hf.text.num_hidden_layers) == (
        model.hf.text.vocab_size,
        model.hf.text.num_hidden_layers,
    )
    for memory in (256 << 20, 12345, 0):
        real = MMCache.blocks_for_memory(memory, 16, model.hf.text.hidden_size, model.torch_dtype)
        small = narrow_mm_cache_bytes(model, memory, 16)
        assert MMCache.blocks_for_memory(small, 16, narrow.hf.text.hidden_size, model.torch_dtype) == real


def test_cost_overrides():
    assert parse_costs("") == LinearCosts()
    costs = parse_costs("step_s=0.5, patch_s=1e-3")
    assert (costs.step_s, costs.patch_s, costs.token_s) == (0.5, 1e-3, LinearCosts().token_s)
    for bad in ("step=1", "step_s", "step_s=-1"):
        with pytest.raises(ValueError):
            parse_costs(bad)
