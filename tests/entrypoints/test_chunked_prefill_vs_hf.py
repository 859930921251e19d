"""Chunked prefill is token-exact: with a budget of 16-32 tokens, prompts are computed over many
steps, chunks end inside image placeholder spans, start after prefix-cache hits, share steps with
other requests' decodes and are preempted half done; the greedy tokens still equal transformers'
and the engine's with whole-prompt prefill."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from epd import LLM, SamplingParams
from epd.engine.scheduler import ScheduledBatch, Scheduler
from epd.lifetime import Event
from epd.testing.images import noise_image
from epd.testing.reference import load_hf_model

GREEDY = SamplingParams(temperature=0, max_tokens=12, logprobs=3)


def _suite():
    """The transformers comparison of test_llm_vs_hf (test modules are not a package)."""
    path = Path(__file__).parent / "test_llm_vs_hf.py"
    spec = importlib.util.spec_from_file_location("_llm_vs_hf_suite", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


suite = _suite()


@pytest.fixture
def hf(checkpoint):
    return load_hf_model(checkpoint)


class StepLog:
    """Every step's (request id, first token, end, prompt length) per scheduled request, and how
    many steps had a request decode beside another's prompt chunk."""

    def __init__(self, scheduler: Scheduler, monkeypatch: pytest.MonkeyPatch) -> None:
        self.steps: list[list[tuple[str, int, int, int]]] = []
        self.mixed = 0
        schedule = scheduler.schedule

        def logged() -> ScheduledBatch:
            batch = schedule()
            step = [
                (r.request_id, r.num_computed_tokens, r.num_computed_tokens + n, r.num_prompt_tokens)
                for r, n in zip(batch.requests, batch.num_new_tokens)
            ]
            decodes = {start >= prompt for _, start, _, prompt in step}
            self.mixed += decodes == {True, False}
            self.steps.append(step)
            return batch

        monkeypatch.setattr(scheduler, "schedule", logged)

    def max_tokens(self) -> int:
        return max(sum(end - start for _, start, end, _ in step) for step in self.steps)

    def chunks(self, request_id: str) -> list[tuple[int, int]]:
        """(first token, end) of the request's prompt chunks, in order."""
        return [
            (s, e) for step in self.steps for rid, s, e, prompt in step if rid == request_id and s < prompt
        ]


def whole_prefill(checkpoint, prompts: list, params: SamplingParams, **options) -> list[list[int]]:
    """The engine's tokens with chunked prefill off."""
    with LLM(str(checkpoint), enable_chunked_prefill=False, **options) as llm:
        return token_ids(llm.generate(prompts, params, use_tqdm=False))


def token_ids(outputs: list) -> list[list[int]]:
    return [o.outputs[0].token_ids for o in outputs]


def test_chunks_that_split_images_match_hf_and_whole_prefill(checkpoint, hf, monkeypatch):
    images = [noise_image(224, 168, seed=1), noise_image(97, 311, seed=2), noise_image(56, 56, seed=3)]
    prompt = {"prompt": suite.user_prompt("Compare these images.", 3), "multi_modal_data": {"image": images}}
    with LLM(str(checkpoint), block_size=4, max_num_batched_tokens=16) as llm:
        log = StepLog(llm.engine.scheduler, monkeypatch)
        outputs = llm.generate([prompt], GREEDY, use_tqdm=False)
        suite.assert_matches_hf(llm, hf, [prompt], outputs, GREEDY.max_tokens)
        spans = [(p.offset, p.end) for p in llm.processor.process_prompt(prompt).placeholders]
    chunks = log.chunks("0")
    assert len(chunks) > 4 and all(end - start == 16 for start, end in chunks[:-1])
    assert any(lo < end < hi for _, end in chunks for lo, hi in spans)  # chunks end inside images
    assert log.max_tokens() <= 16
    assert token_ids(outputs) == whole_prefill(checkpoint, [prompt], GREEDY)


def test_decodes_share_steps_with_chunks_of_other_prompts(checkpoint, hf, monkeypatch):
    prompts = suite.mixed_prompts(8, seed=5)
    with LLM(str(checkpoint), block_size=4, max_num_batched_tokens=32, max_num_seqs=8) as llm:
        log = StepLog(llm.engine.scheduler, monkeypatch)
        outputs = llm.generate(prompts, GREEDY, use_tqdm=False)
        suite.assert_matches_hf(llm, hf, prompts, outputs, GREEDY.max_tokens)
    assert log.mixed > 0 and log.max_tokens() <= 32
    assert token_ids(outputs) == whole_prefill(checkpoint, prompts, GREEDY, max_num_seqs=8)


def test_chunks_after_prefix_cache_hits(checkpoint, hf, monkeypatch):
    image = noise_image(224, 168, seed=7)
    first = {"prompt": suite.user_prompt("What is in this picture?", 1), "multi_modal_data": {"image": image}}
    question = "Describe the colours, the shapes and the light, then say which part stands out most."
    second = {"prompt": suite.user_prompt(question, 1), "multi_modal_data": {"image": image.copy()}}
    with LLM(str(checkpoint), block_size=4, max_num_batched_tokens=16) as llm:
        [out1] = llm.generate([first], GREEDY, use_tqdm=False)
        log = StepLog(llm.engine.scheduler, monkeypatch)
        [out2] = llm.generate([second], GREEDY, use_tqdm=False)
        image_end = llm.processor.process_prompt(second).placeholders[0].end
        assert out2.num_cached_tokens >= image_end - 4  # the image's blocks came from the cache
        chunks = log.chunks(out2.request_id)
        assert chunks[0][0] == out2.num_cached_tokens and len(chunks) >= 2  # chunks follow the hits
        suite.assert_matches_hf(llm, hf, [first, second], [out1, out2], GREEDY.max_tokens)


def test_a_partly_prefilled_request_preempted_recomputes_exactly(checkpoint, hf, monkeypatch):
    """Three short prompts decode while a 125-token two-image prompt is prefilled 13 tokens a step;
    their growth runs the 51 blocks out, and the newest, the half-prefilled prompt, yields."""
    shorts = [suite.user_prompt(f"short question number {i} about a cat") for i in range(3)]
    images = [noise_image(224, 168, seed=1), noise_image(168, 224, seed=2)]
    long = {
        "prompt": suite.user_prompt("Describe all of these in detail.", 2),
        "multi_modal_data": {"image": images},
    }
    prompts, params = [*shorts, long], SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
    preempted = []
    preempt = Scheduler._preempt

    def recorded(self: Scheduler, request, batch: ScheduledBatch) -> None:
        preempted.append((request.num_computed_tokens, request.num_prompt_tokens))
        preempt(self, request, batch)

    monkeypatch.setattr(Scheduler, "_preempt", recorded)
    options = dict(block_size=4, num_kv_blocks=51, max_num_batched_tokens=16)
    with LLM(str(checkpoint), **options) as llm:
        outputs = llm.generate(prompts, params, use_tqdm=False)
        assert llm.engine.block_manager.num_free_blocks == 51  # everything returned
        spans = [(p.offset, p.end) for p in llm.processor.process_prompt(long).placeholders]
        for prompt, out in zip(prompts, outputs):
            expected, _ = suite.reference(hf, llm.processor.process_prompt(prompt), params.max_tokens)
            # ignore_eos: HF stops at EOS, we go on; the shared prefix must agree.
            assert out.outputs[0].token_ids[: len(expected)] == expected
    [(computed, prompt_len)] = preempted
    assert 0 < computed < prompt_len and any(lo < computed < hi for lo, hi in spans)  # mid-image
    encodes = [e.item for e in outputs[-1].metrics.events if e.event is Event.ENCODE_START]
    assert encodes == [0, 1]  # the recompute used the embeddings the request kept
    assert token_ids(outputs) == whole_prefill(checkpoint, prompts, params, block_size=4, num_kv_blocks=51)
