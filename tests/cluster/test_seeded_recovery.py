"""A seeded request whose decode instance dies mid-decode ends with the text of an undisturbed run.

Instance processes, 1E+1P+2D, SIGKILL of D1 mid-decode: each of its requests is prefilled again
(prompt and tokens so far) on P0, which samples the next token and hands the request to D0, the
decode instance the router placed it on (P0 used to decode it itself, D0's reservation unused). No
generator state survives the death, and none is needed: a request's draws depend on its seed and
its token count only (epd.engine.sampler.draw_seed).
"""

from __future__ import annotations

import os
import signal
import time

from epd import LLM, SamplingParams
from epd.lifetime import Event

WAIT_S = 120.0  # a bound on each wait for a state, never a guess at how long work takes


def seeded(i: int) -> SamplingParams:
    return SamplingParams(temperature=0.8, seed=100 + i, max_tokens=200, ignore_eos=True)


def test_seeded_requests_on_a_killed_decode_instance_end_with_the_undisturbed_text(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    prompts = [f"request number {i}" for i in range(4)]
    with LLM(model, layout="1EPD", max_model_len=1024) as reference:
        outs = reference.generate(prompts, [seeded(i) for i in range(4)], use_tqdm=False)
        expected = [o.outputs[0] for o in outs]
    assert len({tuple(c.token_ids) for c in expected}) == 4 and len(set(expected[0].token_ids)) > 3
    with LLM(model, layout="1E+1P+2D", max_model_len=1024) as llm:
        cluster = llm.engine
        for i, prompt in enumerate(prompts):
            cluster.add_request(str(i), llm.processor.process_prompt(prompt), seeded(i))
        on_victim = {rid for rid, s in cluster.router.requests.items() if s.decode == "D1"}
        assert on_victim and len(on_victim) < 4
        outputs: dict = {}
        deadline = time.monotonic() + WAIT_S
        while not all(len(s.token_ids) > 3 for s in cluster.router.requests.values()):
            assert time.monotonic() < deadline, "decoding did not start everywhere"
            outputs.update({o.request_id: o for o in cluster.step() if o.finished})
        assert not outputs, "max_tokens leaves every request decoding when D1 dies"
        os.kill(cluster.router.instances["D1"].ready.pid, signal.SIGKILL)
        while len(outputs) < 4:
            assert time.monotonic() < deadline, "a request hung after D1 died"
            outputs.update({o.request_id: o for o in cluster.step() if o.finished})
        for i in range(4):
            out = outputs[str(i)]
            assert out.error is None, (i, out.error)
            assert out.outputs[0].token_ids == expected[i].token_ids, i
            assert out.outputs[0].text == expected[i].text, i
            # Every request ends on D0: the continuations too, handed off by P0 after one token.
            [finished] = [e for e in out.metrics.events if e.event is Event.FINISHED]
            assert finished.instance == "D0", (i, finished)
        for rid in on_victim:
            events = outputs[rid].metrics.events
            handed = [e for e in events if e.event is Event.KV_TRANSFER_START and e.instance == "P0"]
            assert len(handed) == 2, "P0 handed it off twice: to D1, then its continuation to D0"
            assert {e.instance for e in events if e.event is Event.DECODE_START} == {"D1", "D0"}
        assert cluster.router.stats["retries"] == len(on_victim)
        assert cluster.instance_stats()["D1"]["requests_continue_total"] == len(on_victim)
