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


def test_requests_a_killed_decode_instance_was_decoding_continue_without_a_gap(checkpoints):
    """SIGKILL of D1 mid-decode: its requests are prefilled again (prompt and tokens so far) on P0
    and go on on D0; every request ends with the tokens of an undisturbed run."""
    params = SamplingParams(temperature=0, max_tokens=400, ignore_eos=True)
    prompts = [f"request number {i}" for i in range(6)]
    with LLM(str(checkpoints["qwen2_5_vl"]), layout="1EPD", max_model_len=1024) as reference:
        expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    with LLM(str(checkpoints["qwen2_5_vl"]), layout="1E+1P+2D", max_model_len=1024) as llm:
        cluster = llm.engine
        for i, prompt in enumerate(prompts):
            cluster.add_request(str(i), llm.processor.process_prompt(prompt), params)
        on_victim = {rid for rid, s in cluster.router.requests.items() if s.decode == "D1"}
        assert on_victim and len(on_victim) < 6
        # Let decoding start everywhere, then kill D1 hard. D0's requests may finish before D1's
        # have begun (on a loaded machine): their outputs are kept, not stepped past.
        outputs, deadline = {}, time.monotonic() + 60
        while time.monotonic() < deadline:
            outputs.update({o.request_id: o for o in cluster.step() if o.finished})
            if all(len(s.token_ids) > 3 for s in cluster.router.requests.values()):
                break
        os.kill(cluster.router.instances["D1"].ready.pid, signal.SIGKILL)
        outputs = run_to_the_end(cluster, 6, outputs)
        for i in range(6):
            out = outputs[str(i)]
            assert out.error is None and out.outputs[0].token_ids == expected[i], (i, out.error)
        assert cluster.router.stats["retries"] == len(on_victim)
        assert cluster.instance_stats()["D1"]["requests_continue_total"] == len(on_victim)
        # The cluster keeps serving on the remaining instances.
        [after] = llm.generate(["still there?"], SamplingParams(max_tokens=3), use_tqdm=False)
        assert after.error is None and any(e.event is Event.DECODE_START for e in after.metrics.events)


def test_bad_layouts_are_rejected(checkpoints):
    with pytest.raises(ValueError, match="decodes"):
        LLM(str(checkpoints["qwen2_vl"]), layout="1E+1P")
    with pytest.raises(ValueError, match="no instance encodes"):
        LLM(str(checkpoints["qwen2_vl"]), layout="1P+1D")


def image_prompts(count: int) -> list[dict]:
    from epd.testing.images import noise_image

    pad = "<|vision_start|><|image_pad|><|vision_end|>"
    return [
        {"prompt": f"{pad}Describe image {i}.", "multi_modal_data": {"image": [noise_image(56, 56, seed=i)]}}
        for i in range(count)
    ]


def run_to_the_end(cluster, count: int, finished: dict | None = None) -> dict:
    outputs, deadline = dict(finished or {}), time.monotonic() + 120
    while len(outputs) < count and time.monotonic() < deadline:
        outputs.update({o.request_id: o for o in cluster.step() if o.finished})
    assert len(outputs) == count, "a request hung after the instance died"
    return outputs


def kill_and_wait(cluster, name: str) -> None:
    """SIGKILL the instance and wait until its launcher sees it gone (the router has not looked)."""
    os.kill(cluster.router.instances[name].ready.pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while cluster.launched[name].is_alive() and time.monotonic() < deadline:
        time.sleep(0.05)


@pytest.mark.parametrize("victim", ["E0", "P0"])
def test_work_on_a_dead_encoder_or_prefill_instance_is_redone_elsewhere(checkpoints, victim):
    """The victim dies before the router knows: it places work there, then finds it dead and sends
    the work elsewhere; every request gives the tokens of an undisturbed run."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    with LLM(str(checkpoints["qwen2_5_vl"]), layout="1EPD", max_model_len=1024) as reference:
        outs = reference.generate(image_prompts(4), params, use_tqdm=False)
        expected = [o.outputs[0].token_ids for o in outs]
    with LLM(str(checkpoints["qwen2_5_vl"]), layout="2E+2P+1D", max_model_len=1024) as llm:
        cluster = llm.engine
        kill_and_wait(cluster, victim)
        for i, prompt in enumerate(image_prompts(4)):
            cluster.add_request(str(i), llm.processor.process_prompt(prompt), params)
        placed = {
            rid: (s.prefill, cluster.router.ledger.instances_of(rid))
            for rid, s in cluster.router.requests.items()
        }
        assert any(victim in held for _, held in placed.values()), "some work must have gone to the victim"
        outputs = run_to_the_end(cluster, 4)
        for i in range(4):
            out = outputs[str(i)]
            assert out.error is None and out.outputs[0].token_ids == expected[i], (victim, i, out.error)
        assert not cluster.router.instances[victim].alive
        assert cluster.router.stats["retries"] == (2 if victim == "P0" else 0)


def test_a_dead_instance_is_restarted_and_serves_again(checkpoints):
    """1E+1P+2D, D1 killed: new requests go to D0 at once; D1 comes back (a new process, empty
    caches) and takes requests again."""
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    with LLM(str(checkpoints["qwen2_5_vl"]), layout="1E+1P+2D", max_model_len=1024) as llm:
        cluster = llm.engine
        old_pid = cluster.router.instances["D1"].ready.pid
        kill_and_wait(cluster, "D1")
        first = llm.generate([f"while D1 is down {i}" for i in range(3)], params, use_tqdm=False)
        assert all(o.error is None for o in first)
        deadline = time.monotonic() + 120
        d1 = cluster.router.instances["D1"]
        while not (d1.alive and d1.ready.pid != old_pid) and time.monotonic() < deadline:
            cluster.step()
        assert d1.alive and d1.ready.pid != old_pid, "D1 was not restarted"
        assert cluster.restarter.restarts() == {"D1": 1}
        outs = llm.generate([f"after the restart {i}" for i in range(4)], params, use_tqdm=False)
        assert all(o.error is None and len(o.outputs[0].token_ids) == 4 for o in outs)
        decoders = {e.instance for o in outs for e in o.metrics.events if e.event is Event.DECODE_START}
        assert decoders == {"D0", "D1"}, "the restarted D1 takes its share again"


def test_a_stopped_decode_instance_is_taken_for_dead_and_its_requests_go_on_elsewhere(checkpoints):
    """SIGSTOP: the process lives but sends nothing. After the silence timeout the router takes it
    for dead and its requests go on on D0; what it says once resumed is ignored (fenced)."""
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [f"request number {i}" for i in range(4)]
    with LLM(str(checkpoints["qwen2_5_vl"]), layout="1EPD", max_model_len=1024) as reference:
        expected = [o.outputs[0].token_ids for o in reference.generate(prompts, params, use_tqdm=False)]
    with LLM(str(checkpoints["qwen2_5_vl"]), layout="1E+1P+2D", max_model_len=1024) as llm:
        cluster = llm.engine
        cluster.router.core.silence_timeout_s = 2.0
        stopped = cluster.router.instances["D1"].ready.pid
        os.kill(stopped, signal.SIGSTOP)
        try:
            for i, prompt in enumerate(prompts):
                cluster.add_request(str(i), llm.processor.process_prompt(prompt), params)
            assert {s.decode for s in cluster.router.requests.values()} == {"D0", "D1"}
            outputs = run_to_the_end(cluster, 4)
        finally:
            os.kill(stopped, signal.SIGCONT)
        assert [outputs[str(i)].outputs[0].token_ids for i in range(4)] == expected
        assert all(outputs[str(i)].error is None for i in range(4))
        assert not cluster.router.instances["D1"].alive and cluster.router.stats["retries"] == 2
        [after] = llm.generate(["still there?"], SamplingParams(max_tokens=3), use_tqdm=False)
        assert after.error is None
