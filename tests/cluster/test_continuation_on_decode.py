"""A continuation goes back to a decode instance: P prefills it and hands it off, as a new request.

Instance processes, 1E+1P+2D, SIGKILL of D1 mid-decode: its requests are prefilled again on P0
(prompt and tokens so far), which samples the next token and hands them to D0, the decode
instance the router placed them on. P0 decoded them itself before, while D0's reservation sat
unused.
"""

from __future__ import annotations

import os
import signal
import time

from epd import LLM, SamplingParams
from epd.lifetime import Event

WAIT_S = 120.0  # a bound on each wait for a state, never a guess at how long work takes
PARAMS = SamplingParams(temperature=0, max_tokens=250, ignore_eos=True)


def test_a_continuation_is_handed_to_the_other_decode_instance(checkpoints):
    model = str(checkpoints["qwen2_5_vl"])
    prompts = [f"request number {i}" for i in range(4)]
    with LLM(model, layout="1EPD", max_model_len=1024) as reference:
        expected = [o.outputs[0].token_ids for o in reference.generate(prompts, PARAMS, use_tqdm=False)]
    with LLM(model, layout="1E+1P+2D", max_model_len=1024) as llm:
        cluster = llm.engine
        for i, prompt in enumerate(prompts):
            cluster.add_request(str(i), llm.processor.process_prompt(prompt), PARAMS)
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
        assert cluster.router.stats["retries"] == len(on_victim)
        for i in range(4):
            out = outputs[str(i)]
            assert out.error is None and out.outputs[0].token_ids == expected[i], (i, out.error)
            # Every request ends on D0: the continuations too, handed off by P0 after one token.
            [finished] = [e for e in out.metrics.events if e.event is Event.FINISHED]
            assert finished.instance == "D0", (i, finished)
        for rid in on_victim:
            events = outputs[rid].metrics.events
            handed = [e for e in events if e.event is Event.KV_TRANSFER_START and e.instance == "P0"]
            assert len(handed) == 2, "P0 handed it off twice: to D1, then its continuation to D0"
            decoded = {e.instance for e in events if e.event is Event.DECODE_START}
            assert decoded == {"D1", "D0"}, decoded
