"""Fixtures of tests/engine: an engine config on the tiny checkpoint."""

from __future__ import annotations

import pytest

from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor


@pytest.fixture(scope="module")
def setup(checkpoints):
    """(engine config with small KV blocks, input processor) of the tiny Qwen2.5-VL checkpoint."""
    model = str(checkpoints["qwen2_5_vl"])
    processor = InputProcessor.from_pretrained(model)
    config = EngineArgs(model=model, block_size=4, num_kv_blocks=256).engine_config()
    return config, processor
