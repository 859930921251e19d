"""Chunked prefill: scheduler decisions (the token budget, decodes first, preemption of a partly
prefilled prompt), and what the engine does around a chunk (no sample, one encode per image, whole
prompts where it hands its KV off, eager steps). Token-exactness against transformers is in
tests/entrypoints/test_chunked_prefill_vs_hf.py."""

from __future__ import annotations

import random

import pytest
import torch

from epd import SamplingParams
from epd.config import DEFAULT_CHUNKED_PREFILL_TOKENS, SchedulerConfig
from epd.engine.block_manager import BlockManager
from epd.engine.llm_engine import LLMEngine
from epd.engine.model_runner import StepInputs
from epd.engine.request import Request, RequestStatus
from epd.engine.scheduler import ScheduledBatch, Scheduler
from epd.entrypoints.options import EngineArgs
from epd.inputs.processor import InputProcessor
from epd.inputs.types import ProcessedPrompt
from epd.lifetime import Event
from epd.testing.images import noise_image

IMAGE = "<|vision_start|><|image_pad|><|vision_end|>"


def make_request(rid: str, num_tokens: int, first_token: int = 0, max_tokens: int = 100) -> Request:
    ids = list(range(first_token, first_token + num_tokens))
    return Request(rid, ProcessedPrompt(ids, [], []), SamplingParams(max_tokens=max_tokens), merge_size=2)


def chunked(num_blocks: int, budget: int, max_num_seqs: int = 8, block_size: int = 4) -> Scheduler:
    blocks = BlockManager(num_blocks, block_size)
    return Scheduler(blocks, max_num_seqs, budget, chunked_prefill=True)


def run_step(scheduler: Scheduler, sampled_token: int = 7) -> ScheduledBatch:
    """What the engine does after the model ran: mark computed, commit, sample where the batch says."""
    batch = scheduler.schedule()
    for req, n, samples in zip(batch.requests, batch.num_new_tokens, batch.samples):
        req.num_computed_tokens += n
        scheduler.blocks.commit(req.request_id, req.all_token_ids, (), req.num_computed_tokens)
        if samples:
            req.output_token_ids.append(sampled_token)
    return batch


def tokens_of(batch: ScheduledBatch, request: Request) -> int:
    return batch.num_new_tokens[batch.requests.index(request)] if request in batch.requests else 0


# ---- the scheduler ----------------------------------------------------------------------------


def test_a_running_decode_gets_a_token_every_step_while_a_long_prompt_is_chunked():
    scheduler = chunked(num_blocks=100, budget=16)
    short = make_request("short", 6)
    scheduler.add(short)
    run_step(scheduler)
    long = make_request("long", 100, first_token=1000)
    scheduler.add(long)
    chunks = []
    while not long.output_token_ids:
        batch = run_step(scheduler)
        assert batch.requests[0] is short and batch.num_new_tokens[0] == 1  # the decode goes first
        assert batch.total_tokens <= 16
        chunks.append(tokens_of(batch, long))
        assert batch.samples == [True, long.num_computed_tokens == 100]
    assert chunks == [15] * 6 + [10]  # the rest of the budget each step, the remainder last
    assert len(short.output_token_ids) == 1 + len(chunks)  # never stalled


def test_without_chunking_the_long_prompt_takes_one_step_over_the_budget():
    """Whole prompts (chunking off, as where the engine hands off): the stall chunking removes."""
    scheduler = Scheduler(BlockManager(100, 4), max_num_seqs=8, max_num_batched_tokens=16)
    short, long = make_request("short", 6), make_request("long", 100, first_token=1000)
    scheduler.add(short)
    run_step(scheduler)
    scheduler.add(long)
    assert run_step(scheduler).num_new_tokens == [1]  # does not fit beside the decode: waits
    scheduler.finish(short)
    assert run_step(scheduler).num_new_tokens == [100]  # alone, whole, over the budget


def test_a_new_prompt_takes_what_the_partly_prefilled_ones_leave():
    scheduler = chunked(num_blocks=100, budget=16)
    first, second = make_request("first", 20), make_request("second", 20, first_token=100)
    scheduler.add(first)
    scheduler.add(second)
    batch = run_step(scheduler)
    assert batch.requests == [first] and batch.num_new_tokens == [16]
    batch = run_step(scheduler)  # the older prompt's rest first, then the new one
    assert batch.requests == [first, second] and batch.num_new_tokens == [4, 12]
    assert batch.samples == [True, False]


@pytest.mark.parametrize("seed", range(4))
def test_no_step_exceeds_the_budget_and_every_request_completes(seed):
    rng = random.Random(seed)
    budget = rng.choice([8, 16, 32])
    scheduler = chunked(num_blocks=60, budget=budget, max_num_seqs=6)
    pending = [
        make_request(f"r{i}", rng.randint(1, 70), 1000 * i, max_tokens=rng.randint(1, 12)) for i in range(12)
    ]
    done: list[Request] = []
    for _ in range(500):
        if pending and rng.random() < 0.4:
            scheduler.add(pending.pop(0))
        decoding = [r for r in scheduler.running if r.num_tokens_to_compute == 1]
        batch = run_step(scheduler)
        assert batch.total_tokens <= budget
        if not batch.preempted:  # room for every decode: each one got its token
            assert all(r in batch.requests for r in decoding[:budget])
        for req in list(scheduler.running):
            if len(req.output_token_ids) >= req.params.max_tokens:
                scheduler.finish(req)
                done.append(req)
        scheduler.blocks.check_invariants()
        if not pending and not scheduler.has_unfinished():
            break
    assert len(done) == 12
    assert all(len(r.output_token_ids) == r.params.max_tokens for r in done)


def test_decodes_past_the_budget_wait_their_turn():
    scheduler = chunked(num_blocks=100, budget=6)
    requests = [make_request(f"r{i}", 2, 100 * i) for i in range(3)]
    for r in requests:
        scheduler.add(r)
    run_step(scheduler)  # all three prompts in one step
    scheduler.max_num_batched_tokens = 2  # now fewer tokens than running decodes
    for _ in range(2):
        batch = run_step(scheduler)
        assert batch.requests == requests[:2] and batch.total_tokens == 2  # oldest first
    assert requests[2].status is RequestStatus.RUNNING and scheduler.blocks.has("r2")  # blocks kept


@pytest.mark.parametrize("prefix_caching", [False, True])
def test_a_partly_prefilled_request_is_preempted_first_and_recomputed(prefix_caching):
    # 9 blocks of 4: "old" takes 2 and grows while "new" (24 tokens, 6 blocks) is prefilled 2 a step.
    scheduler = Scheduler(BlockManager(9, 4, prefix_caching), 8, 3, chunked_prefill=True)
    old, new = make_request("old", 8), make_request("new", 24, first_token=100)
    scheduler.add(old)
    while not old.output_token_ids:
        run_step(scheduler)
    scheduler.add(new)
    computed_before = 0
    while new.num_preemptions == 0:
        computed_before = new.num_computed_tokens
        batch = run_step(scheduler)
    assert batch.preempted == [new] and 0 < computed_before < 24  # partly prefilled
    assert new.num_computed_tokens == 0 and scheduler.waiting[0] is new and not new.output_token_ids
    scheduler.finish(old)
    batch = run_step(scheduler)
    # Its committed full blocks stay in the prefix cache and spare recomputing them.
    assert batch.requests == [new]
    assert new.num_computed_tokens - batch.num_new_tokens[0] == (
        computed_before // 4 * 4 if prefix_caching else 0
    )
    while not new.output_token_ids:
        run_step(scheduler)
    assert new.num_computed_tokens == 24 and new.num_cached_tokens == 0  # first admission had no hits
    scheduler.blocks.check_invariants()


def test_scheduler_config_budget_follows_the_prefill_policy():
    assert SchedulerConfig().budget(4096) == DEFAULT_CHUNKED_PREFILL_TOKENS
    assert SchedulerConfig(max_num_batched_tokens=64).budget(4096) == 64
    whole = SchedulerConfig(max_num_batched_tokens=64, enable_chunked_prefill=False)
    assert whole.budget(4096) == 4096  # a whole prompt must fit one step
    assert SchedulerConfig(max_num_batched_tokens=8192, enable_chunked_prefill=False).budget(4096) == 8192
    with pytest.raises(ValueError, match="max_num_batched_tokens"):
        SchedulerConfig(max_num_batched_tokens=0)


# ---- the engine -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


@pytest.fixture(scope="module")
def processor(model) -> InputProcessor:
    return InputProcessor.from_pretrained(model)


def engine(model: str, processor: InputProcessor, budget: int = 16, **kwargs) -> LLMEngine:
    config = EngineArgs(
        model=model, block_size=4, num_kv_blocks=256, max_num_batched_tokens=budget
    ).engine_config()
    return LLMEngine(config, processor.tokenizer, **kwargs)


def two_image_prompt(processor: InputProcessor):
    images = [noise_image(224, 168, seed=1), noise_image(112, 112, seed=2)]
    text = f"{IMAGE}first {' '.join(['word'] * 20)} then {IMAGE}second"
    return processor.process_prompt({"prompt": text, "multi_modal_data": {"image": images}})


def test_a_chunk_samples_nothing_and_events_mark_the_whole_prefill(model, processor):
    llm = engine(model, processor)
    prompt = two_image_prompt(processor)
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    req = llm.add_request("r", prompt, params)
    steps = 0
    while not req.output_token_ids:
        outputs = llm.step()
        steps += 1
        assert outputs == [] or req.output_token_ids
    assert steps == -(-len(prompt.prompt_token_ids) // 16) and llm.num_steps == steps
    while llm.has_unfinished_requests():
        llm.step()
    events = [e.event for e in req.metrics.events]
    assert events.count(Event.PREFILL_START) == 1 and events.count(Event.PREFILL_END) == 1
    assert events.index(Event.PREFILL_START) < events.index(Event.PREFILL_END)
    assert len(req.output_token_ids) == 3


def test_images_are_encoded_once_each_in_the_step_that_reaches_them(model, processor, monkeypatch):
    llm = engine(model, processor)
    calls, encode = [], llm.model.encode_images

    def counted(pixels: torch.Tensor, grids: list) -> list[torch.Tensor]:
        calls.append(grids)
        return encode(pixels, grids)

    monkeypatch.setattr(llm.model, "encode_images", counted)
    prompt = two_image_prompt(processor)
    first, second = prompt.placeholders
    assert first.end - first.offset > 16  # the first image's span is split between chunks
    req = llm.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=2))
    llm.step()
    assert req.image_embeds[0] is not None and req.image_embeds[1] is None  # not reached yet
    while llm.has_unfinished_requests():
        llm.step()
    assert [len(grids) for grids in calls] == [1, 1]
    assert [e.item for e in req.metrics.events if e.event is Event.ENCODE_START] == [0, 1]


def test_an_engine_that_hands_off_prefills_whole_prompts(model, processor):
    handed = []
    llm = engine(model, processor, handoff=lambda req, kv: handed.append((req, kv)))
    assert not llm.scheduler.chunked_prefill and llm.scheduler.max_num_batched_tokens == llm.max_model_len
    prompt = two_image_prompt(processor)
    llm.add_request("r", prompt, SamplingParams(temperature=0, max_tokens=4))
    llm.step()
    assert llm.last_batch_tokens == len(prompt.prompt_token_ids) and len(handed) == 1
    [(req, kv)] = handed
    assert kv.shape[2] == len(prompt.prompt_token_ids)
    llm.rewire(None, None, None)  # becomes an engine that decodes: it chunks
    assert llm.scheduler.chunked_prefill and llm.scheduler.max_num_batched_tokens == 16


def test_chunked_prefill_is_on_by_default_and_can_be_turned_off(model, processor):
    on = LLMEngine(EngineArgs(model=model, num_kv_blocks=64).engine_config(), processor.tokenizer)
    assert on.scheduler.chunked_prefill
    assert on.scheduler.max_num_batched_tokens == DEFAULT_CHUNKED_PREFILL_TOKENS
    config = EngineArgs(model=model, num_kv_blocks=64, enable_chunked_prefill=False).engine_config()
    off = LLMEngine(config, processor.tokenizer)
    assert not off.scheduler.chunked_prefill and off.scheduler.max_num_batched_tokens == off.max_model_len


def test_a_step_with_a_prompt_chunk_never_takes_the_graph_path():
    """CUDA graphs replay pure decodes only: a one-token chunk inside a prompt is not one."""
    decoding, prefilling = make_request("d", 10), make_request("p", 10, first_token=100)
    decoding.num_computed_tokens, decoding.output_token_ids = 10, [5]
    prefilling.num_computed_tokens = 9  # its last prompt token
    tables = [[0, 1, 2], [3, 4, 5]]

    def inputs(*pairs: tuple[Request, int]) -> StepInputs:
        batch = ScheduledBatch()
        for req, n in pairs:
            batch.add(req, n)
        return StepInputs.build(batch, tables[: len(pairs)], block_size=4)

    assert inputs((decoding, 1)).decode_positions == [10 + decoding.mrope_delta]
    assert inputs((decoding, 1), (prefilling, 1)).decode_positions is None
    assert inputs((prefilling, 1)).decode_positions is None
    positions = inputs((decoding, 1), (prefilling, 1)).positions_tensor()
    assert torch.equal(positions[:, 1], prefilling.prompt_positions[:, 9])
