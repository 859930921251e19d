"""An embedding send that an encoder gives up on (its retries used) does not hang its request.

The encoder unpins that copy and tells the router (`EmbeddingNotSent`); the router tells P
(`EmbeddingsLost`), whose waiting request asks again (`NeedEmbeddings`) and gets the image from
the encoder's cache. A request that lost its image `max_attempts` times fails, saying why.

| request  | E0's sends of its image (2 retries each)  | outcome                                    |
|----------|-------------------------------------------|--------------------------------------------|
| flaky    | the first 3 dropped: one give-up          | asked again, the undisturbed tokens        |
| never    | all dropped                               | fails after 3 give-ups, with their error   |
| text     | (no image)                                | the undisturbed tokens                     |
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest
from flaky_transfer import Drop, FlakyLauncher
from router_harness import encode_done, image, make_core, need, prompt

from epd import LLM, SamplingParams
from epd.cluster.cluster import Cluster
from epd.cluster.layout import Layout
from epd.cluster.messages import AbortRequest, EmbeddingNotSent, EmbeddingsLost, EncodeTask, InstanceReady
from epd.cluster.router import Outgoing
from epd.entrypoints.async_engine import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.testing.images import noise_image
from epd.transfer.retry import GAVE_UP

WAIT_S = 120.0  # a bound on each wait for a state, never a guess at how long work takes
PARAMS = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
PAD = "<|vision_start|><|image_pad|><|vision_end|>"
GAVE_UP_ERROR = f"{GAVE_UP} 3 attempts: dropped by the test"


def not_sent(content_hash: str, dest: str = "data://P0") -> EmbeddingNotSent:
    return EmbeddingNotSent("E0", content_hash, dest, GAVE_UP_ERROR)


# ---- the router alone -----------------------------------------------------------------------


def test_a_lost_embedding_is_asked_for_again_until_the_attempts_are_used():
    core, _, _ = make_core("1E+1P+1D")
    core.add_request("r", prompt(8, [image("a")]), PARAMS)
    core.handle(encode_done("E0", "r", [0]))
    assert core.held.holds("P0", "a")

    for _ in range(core.max_attempts - 1):
        assert core.handle(not_sent("a")) == [Outgoing("P0", EmbeddingsLost(["a"]))]
        assert not core.held.holds("P0", "a"), "not on its way any more"
        [(to, task)] = core.handle(need("P0", "r", [0]))  # P asks again: sent to encode again
        assert to == "E0" and isinstance(task, EncodeTask) and task.dest == "data://P0"
        core.handle(encode_done("E0", "r", [0]))
        assert core.take_outputs() == []

    out = core.handle(not_sent("a"))
    assert out == [
        Outgoing("D0", AbortRequest("r")),
        Outgoing("P0", AbortRequest("r")),
        Outgoing("P0", EmbeddingsLost(["a"])),  # after the abort: other requests there ask again
    ]
    [failed] = core.take_outputs()
    assert failed.finished and failed.error == f"E0: embeddings not sent to P0 3 times: {GAVE_UP_ERROR}"
    assert not core.has_unfinished() and core.ledger.is_empty() and core.embeddings_not_sent == {}


def test_a_lost_embedding_counts_only_for_requests_whose_prefill_p_holds():
    core, _, _ = make_core("1E+1P+1D")
    core.add_request("waits", prompt(8, [image("a")]), PARAMS)
    core.add_request("other", prompt(8, [image("b")]), PARAMS)
    core.handle(not_sent("a"))
    assert core.embeddings_not_sent == {"waits": 1}


def test_a_give_up_for_an_address_p_no_longer_has_is_ignored():
    """P died and came back at a new address: its death told the encoders (DestinationGone) and
    its requests went elsewhere; a late give-up for the old address is no news for the new P."""
    core, fake, _ = make_core("1E+1P+1D")
    fake.kill("P0")
    core.tick()
    core.handle(InstanceReady("P0", "ctl://P0", "data://P0-again", 0, 0, 0, 4096))
    assert core.handle(not_sent("a", "data://P0")) == []


# ---- instance processes ---------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


def image_prompt(seed: int) -> dict:
    return {"prompt": f"{PAD}Describe it.", "multi_modal_data": {"image": [noise_image(56, 56, seed=seed)]}}


PROMPTS = {"flaky": image_prompt(3), "never": image_prompt(4), "text": "a request without images"}


def run_until(cluster: Cluster, done: Callable[[], bool], what: str, outputs: dict) -> None:
    deadline = time.monotonic() + WAIT_S
    while not done():
        assert time.monotonic() < deadline, f"{what} not within {WAIT_S} s: a hang"
        outputs.update({o.request_id: o for o in cluster.step() if o.finished})


def test_embeddings_dropped_beyond_their_retries_are_sent_again_and_never_hang(model):
    with LLM(model, layout="1EPD", max_model_len=1024) as reference:
        outs = reference.generate([PROMPTS["flaky"], PROMPTS["text"]], PARAMS, use_tqdm=False)
    expected = {"flaky": outs[0].outputs[0].token_ids, "text": outs[1].outputs[0].token_ids}
    processor = InputProcessor.from_pretrained(model)
    processed = {rid: processor.process_prompt(p) for rid, p in PROMPTS.items()}
    never = processed["never"].images[0].content_hash
    drops = [Drop("E0", f"mm:{never}"), Drop("E0", "mm:", times=3)]  # the first rule that picks wins
    config = EngineArgs(model=model, max_model_len=1024).engine_config()
    layout = Layout.parse("1E+1P+1D")
    cluster = Cluster(layout, config, transfer="shm", transfer_retries=2, launcher=FlakyLauncher(drops))
    try:
        for rid, prompt_ in processed.items():
            cluster.add_request(rid, prompt_, PARAMS)
        outputs: dict = {}
        run_until(cluster, lambda: len(outputs) == len(PROMPTS), "every request's end", outputs)
        for rid in ("flaky", "text"):
            assert outputs[rid].error is None, (rid, outputs[rid].error)
            assert outputs[rid].outputs[0].token_ids == expected[rid], rid
        error = outputs["never"].error
        assert error == f"E0: embeddings not sent to P0 3 times: {GAVE_UP_ERROR}", error
        assert cluster.router.stats["retries"] == 0, "P asked again: nothing was placed anew"

        # E0 gave up 4 times (once on `flaky`, 3 times on `never`), retrying twice each time, and
        # holds no pin for a copy that never arrived.
        stats = cluster.instance_stats
        counts = {"transfer_retries_total": 8.0, "transfer_gave_up_total": 4.0, "mm_cache_usage": 0.0}
        run_until(cluster, lambda: counts.items() <= stats().get("E0", {}).items(), "E0's counts", outputs)
        assert stats()["P0"]["transfer_gave_up_total"] == 0 and stats()["D0"]["transfer_retries_total"] == 0
        assert not cluster.has_unfinished_requests()
    finally:
        cluster.shutdown()
