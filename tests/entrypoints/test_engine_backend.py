"""AsyncEngine drives either backend through one protocol, and a request that no instance can take
fails alone: the engine thread keeps serving."""

from __future__ import annotations

import asyncio
import os
import signal
import time

import pytest

from epd import SamplingParams
from epd.cluster.cluster import Cluster
from epd.engine.llm_engine import LLMEngine
from epd.entrypoints.async_engine import AsyncEngine, EngineArgs
from epd.entrypoints.backend import EngineBackend

PARAMS = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)


async def _generate(engine: AsyncEngine, request_id: str, text: str) -> list[int]:
    prompt = engine.processor.process_prompt(text)
    last = None
    async for out in engine.generate(prompt, PARAMS, request_id):
        last = out
    return last.outputs[0].token_ids


def _wait_until(condition, what: str, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.mark.parametrize("layout", ["1EPD", "1EP+1D"])
def test_both_backends_serve_through_the_protocol(checkpoints, layout):
    engine = AsyncEngine(EngineArgs(model=str(checkpoints["qwen2_vl"]), layout=layout))
    try:
        assert isinstance(engine.engine, EngineBackend)
        assert isinstance(engine.engine, LLMEngine if layout == "1EPD" else Cluster)
        assert len(asyncio.run(_generate(engine, "a", "hello there"))) == PARAMS.max_tokens
        assert engine.instances_up() == dict.fromkeys(["EPD0"] if layout == "1EPD" else ["EP0", "D0"], True)
        assert engine.is_healthy()
    finally:
        engine.shutdown()


def test_a_request_no_instance_can_take_fails_alone(checkpoints):
    engine = AsyncEngine(EngineArgs(model=str(checkpoints["qwen2_vl"]), layout="1EP+1D"))
    try:
        decode = engine.engine.router.instances["D0"]
        os.kill(decode.ready.pid, signal.SIGKILL)
        _wait_until(lambda: not engine.instances_up()["D0"], "the router to notice D0 is gone")
        with pytest.raises(RuntimeError, match="no live instance can take role D"):
            asyncio.run(_generate(engine, "b", "hello again"))
        # The engine thread survived the refusal: it still answers for the live instance.
        assert engine._thread.is_alive()
        assert engine.instances_up() == {"EP0": True, "D0": False}
    finally:
        engine.shutdown()
