"""Instance processes: failures are contained, shutdown leaves nothing behind."""

from __future__ import annotations

import os
import signal
import time

import pytest

from epd import LLM, SamplingParams
from epd.lifetime import Event


def pid_exists(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


def test_shutdown_leaves_no_child_process(checkpoints):
    with LLM(str(checkpoints["qwen2_vl"]), layout="1E+1P+1D", transfer="tcp") as llm:
        pids = [h.ready.pid for h in llm.engine.router.instances.values()]
        assert all(pid_exists(p) for p in pids)
        [out] = llm.generate(["hello"], SamplingParams(max_tokens=2), use_tqdm=False)
        assert out.finished
    deadline = time.monotonic() + 10
    while any(pid_exists(p) for p in pids) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not any(pid_exists(p) for p in pids)


def test_killed_decode_instance_fails_only_its_requests(checkpoints):
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    with LLM(str(checkpoints["qwen2_5_vl"]), layout="1E+1P+2D", max_model_len=1024) as llm:
        cluster = llm.engine
        for i in range(6):
            cluster.add_request(str(i), llm.processor.process_prompt(f"request number {i}"), params)
        victim = cluster.router.instances["D1"]
        on_victim = {rid for rid, s in cluster.router.requests.items() if s.decode == "D1"}
        assert on_victim and len(on_victim) < 6
        # Let decoding start everywhere, then kill D1 hard.
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            cluster.step()
            states = cluster.router.requests.values()
            if all(len(s.token_ids) > 3 for s in states):
                break
        os.kill(victim.ready.pid, signal.SIGKILL)
        outputs = {}
        deadline = time.monotonic() + 120
        while len(outputs) < 6 and time.monotonic() < deadline:
            outputs.update({o.request_id: o for o in cluster.step() if o.finished})
        assert len(outputs) == 6, "a request hung after the instance died"
        for rid, out in outputs.items():
            if rid in on_victim:
                assert out.outputs[0].finish_reason == "error" and "D1" in out.error
            else:
                assert out.error is None and len(out.outputs[0].token_ids) == 400
        # The cluster keeps serving on the remaining instances.
        [after] = llm.generate(["still there?"], SamplingParams(max_tokens=3), use_tqdm=False)
        assert after.error is None and any(e.event is Event.DECODE_START for e in after.metrics.events)


def test_bad_layouts_are_rejected(checkpoints):
    with pytest.raises(ValueError, match="decodes"):
        LLM(str(checkpoints["qwen2_vl"]), layout="1E+1P")
    with pytest.raises(ValueError, match="encoder-only"):
        LLM(str(checkpoints["qwen2_vl"]), layout="1EP+1P+1D")
