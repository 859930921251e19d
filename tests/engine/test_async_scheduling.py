"""Async scheduling (epd.engine.async_scheduling) gives the synchronous engine's outputs: the same
tokens, logprobs, finish and stop reasons and texts, for requests that end at different steps (stop
tokens, stop strings, max_tokens of 1, 2 and many), with aborts, preemption, chunked prefill and
seeded sampling; every KV block is free at the end; and decode steps really overlap (a counter).

Bit for bit where both engines run the same batches: requests that end by their length only (known
before their last token) waste no row. A request that ends on its token (EOS, stop), or an abort, or
an arrival, leaves the async engine's next step one row larger, or one step later, than the
synchronous one: its other rows then come out of a GEMM of another shape, which on a CPU rounds
differently (~1e-7): tokens, reasons and texts still agree, logprobs to rounding (`exact=False`).
"""

from __future__ import annotations

from dataclasses import replace

import pytest
import torch
from async_runs import (
    Hook,
    assert_all_blocks_free,
    both,
    overlapped_steps,
    prompt,
    reference_tokens,
    run_random_mix,
)

from epd import LLM, SamplingParams
from epd.config import EngineConfig
from epd.engine.async_scheduling import PLACEHOLDER
from epd.engine.block_manager import BlockManager
from epd.engine.llm_engine import LLMEngine
from epd.engine.request import Request
from epd.engine.scheduler import Scheduler
from epd.engine.scripted_runner import scripted_parts
from epd.entrypoints.options import EngineArgs
from epd.inputs.types import ProcessedPrompt
from epd.testing.images import noise_image
from epd.testing.reference import assert_logprobs_match, hf_greedy, load_hf_model

# ---- outputs equal the synchronous engine's ------------------------------------------------------


def test_requests_ending_by_length_give_bit_identical_outputs(setup):
    """No row is wasted: the same batches run, so even the logprobs agree bit for bit."""
    greedy = dict(temperature=0, ignore_eos=True)
    requests = {
        "one": (prompt(1, 11), SamplingParams(max_tokens=1, **greedy)),
        "two": (prompt(2, 14), SamplingParams(max_tokens=2, logprobs=2, **greedy)),
        "many": (prompt(5, 23), SamplingParams(max_tokens=40, logprobs=3, **greedy)),
        "some": (prompt(7, 16), SamplingParams(max_tokens=9, **greedy)),
        "seeded": (
            prompt(11, 21),
            SamplingParams(temperature=0.9, seed=7, max_tokens=25, logprobs=1, ignore_eos=True),
        ),
    }
    sync, _, engine = both(setup, requests)
    assert [len(sync[r][0]) for r in ("one", "two", "many", "some", "seeded")] == [1, 2, 40, 9, 25]
    assert overlapped_steps(engine) > 0


def test_requests_ending_at_max_model_len_give_bit_identical_outputs(setup):
    greedy = dict(temperature=0, ignore_eos=True, max_tokens=100)
    requests = {f"r{i}": (prompt(i, 20 + 4 * i), SamplingParams(**greedy)) for i in range(4)}
    sync, _, engine = both(setup, requests, max_model_len=48)
    assert [len(sync[f"r{i}"][0]) for i in range(4)] == [28, 24, 20, 16]  # prompt + output = 48
    assert all(out[2] == "length" for out in sync.values())
    assert overlapped_steps(engine) > 0


def test_requests_ending_on_stop_tokens_eos_and_stop_strings_give_the_sync_outputs(setup):
    _, processor = setup
    stopper, texter = prompt(3, 19), prompt(40, 25)
    stop_at = reference_tokens(setup, stopper)
    # The first token that did not come before: the request stops on it at that step (not the first).
    j = next(i for i, t in enumerate(stop_at) if i >= 3 and t not in stop_at[:i])
    text = processor.tokenizer.decode(reference_tokens(setup, texter)[:9], True)
    stop_string = text[-3:]
    assert stop_string.strip(), "the reference text must give a stop string"
    greedy = dict(temperature=0, ignore_eos=True)
    requests = {
        "one": (prompt(1, 11), SamplingParams(max_tokens=1, **greedy)),
        "two": (prompt(2, 14), SamplingParams(max_tokens=2, **greedy)),
        "many": (prompt(5, 23), SamplingParams(max_tokens=40, logprobs=3, **greedy)),
        "stop-token": (stopper, SamplingParams(max_tokens=30, stop_token_ids=[stop_at[j]], **greedy)),
        "stop-string": (texter, SamplingParams(max_tokens=30, stop=[stop_string], **greedy)),
        "eos": (prompt(9, 17), SamplingParams(temperature=0, max_tokens=30, logprobs=0)),
        "seeded": (prompt(11, 21), SamplingParams(temperature=0.9, seed=7, max_tokens=25, logprobs=1)),
    }
    sync, _, engine = both(setup, requests, exact=False)
    assert sync["stop-token"][2:4] == ("stop", stop_at[j]) and len(sync["stop-token"][0]) == j + 1
    assert sync["stop-string"][2:4] == ("stop", stop_string)
    assert [len(sync[r][0]) for r in ("one", "two", "many")] == [1, 2, 40]
    assert overlapped_steps(engine) > 0


def test_every_request_ending_on_a_stop_token_at_one_step_leaves_a_wasted_step_and_no_leak(setup):
    """All rows of the step launched after their last token are wasted: nothing comes of it."""
    stopper = prompt(3, 19)
    stop_at = reference_tokens(setup, stopper)
    j = next(i for i, t in enumerate(stop_at) if i >= 4 and t not in stop_at[:i])
    params = SamplingParams(temperature=0, max_tokens=30, stop_token_ids=[stop_at[j]], ignore_eos=True)
    requests = {f"r{i}": (stopper, params) for i in range(3)}
    sync, _, engine = both(setup, requests, exact=False)
    assert all(out[0] == stop_at[: j + 1] for out in sync.values())
    wasted = engine.async_steps.inflight  # launched before the stop tokens were read
    assert wasted is not None and all(r.is_finished for r in wasted.requests)
    assert overlapped_steps(engine) > 0


def test_aborts_mid_run_give_the_sync_outputs(setup):
    """A request aborted once it has shown 5 tokens keeps exactly those (its token in flight is dropped)."""
    greedy = dict(temperature=0, ignore_eos=True)
    requests = {
        f"r{i}": (prompt(i, 13 + 2 * i), SamplingParams(max_tokens=20 + i, **greedy)) for i in range(4)
    }
    shown: dict[str, list[int]] = {}

    def aborter() -> Hook:
        def hook(engine: LLMEngine, step_outputs: list) -> None:
            for out in step_outputs:
                if out.request_id in ("r1", "r3") and len(out.outputs[0].token_ids) == 5:
                    request = engine.requests[out.request_id]
                    engine.abort_request(out.request_id)
                    shown.setdefault(("async" if engine.async_steps else "sync") + out.request_id, []).extend(
                        request.output_token_ids
                    )

        return hook

    sync, _, engine = both(setup, requests, aborter, exact=False)
    assert set(sync) == {"r0", "r2"}  # the aborted ones never finish
    assert shown["syncr1"] == shown["asyncr1"] and len(shown["asyncr1"]) == 5
    assert shown["syncr3"] == shown["asyncr3"] and len(shown["asyncr3"]) == 5
    assert overlapped_steps(engine) > 0


def test_preemption_under_a_small_kv_cache_gives_the_sync_outputs(setup):
    greedy = dict(temperature=0, ignore_eos=True)
    requests = {f"r{i}": (prompt(i, 10 + 3 * i), SamplingParams(max_tokens=30, **greedy)) for i in range(5)}
    sync_engine_preemptions = []

    def counter() -> Hook:
        def hook(engine: LLMEngine, _: list) -> None:
            if not engine.has_unfinished_requests():
                sync_engine_preemptions.append(engine.scheduler.num_preemptions)

        return hook

    _, _, engine = both(setup, requests, counter, num_kv_blocks=28)
    assert sync_engine_preemptions[0] > 0, "the cache must be small enough to preempt"
    assert sync_engine_preemptions[0] == sync_engine_preemptions[1]
    assert overlapped_steps(engine) > 0


def test_chunked_prefill_of_prompts_arriving_mid_run_gives_the_sync_outputs(setup):
    """Long prompts arrive while others decode; with a small budget they prefill in chunks beside the
    decodes (synchronous steps), and the decodes overlap again once they are done."""
    _, processor = setup
    greedy = dict(temperature=0, ignore_eos=True)
    requests = {f"d{i}": (prompt(i, 9 + i), SamplingParams(max_tokens=40, **greedy)) for i in range(3)}
    late = {f"p{i}": (prompt(50 + i, 45 + 6 * i), SamplingParams(max_tokens=12, **greedy)) for i in range(2)}

    def arrivals() -> Hook:
        steps = [0]

        def hook(engine: LLMEngine, _: list) -> None:
            steps[0] += 1
            if steps[0] in (4, 9):
                rid = f"p{steps[0] // 5}"
                engine.add_request(rid, processor.process_prompt(late[rid][0]), late[rid][1])

        return hook

    sync, _, engine = both(setup, requests, arrivals, exact=False, max_num_batched_tokens=16)
    assert {"p0", "p1"} <= set(sync) and len(sync["p1"][0]) == 12
    assert overlapped_steps(engine) > 0


def test_seeded_sampling_overlaps_and_gives_the_sync_outputs(setup):
    requests = {
        f"s{i}": (
            prompt(i, 12),
            SamplingParams(
                temperature=1.0, top_p=0.9, seed=i, max_tokens=15 + 3 * i, ignore_eos=True, logprobs=2
            ),
        )
        for i in range(4)
    }
    sync, _, engine = both(setup, requests)
    assert len({tuple(out[0]) for out in sync.values()}) > 1
    assert overlapped_steps(engine) > 0


def test_unseeded_random_sampling_runs_synchronously_and_gives_the_sync_outputs(setup):
    """A wasted row would advance the shared generator: such steps are not continued."""
    params = SamplingParams(temperature=1.0, max_tokens=12)
    requests = {f"u{i}": (prompt(i, 12), params) for i in range(3)}
    _, _, engine = both(setup, requests)
    assert overlapped_steps(engine) == 0


def test_batched_text_and_image_requests_match_transformers(checkpoint):
    """Through the LLM API, both model families, images prefilled beside async decodes; greedy tokens
    against HF `generate` of each prompt alone, with a small cache that preempts."""
    image = "<|vision_start|><|image_pad|><|vision_end|>"
    prompts = [
        f"<|im_start|>user\n{image * (i % 3)}describe picture {i} {'in detail ' * i}<|im_end|>\n"
        for i in range(6)
    ]
    requests = [
        {
            "prompt": text,
            "multi_modal_data": {"image": [noise_image(56 + 20 * i, 84, seed=i + j) for j in range(i % 3)]},
        }
        if i % 3
        else text
        for i, text in enumerate(prompts)
    ]
    params = SamplingParams(temperature=0, max_tokens=14, logprobs=2)
    hf = load_hf_model(checkpoint)
    with LLM(str(checkpoint), block_size=4, num_kv_blocks=60, async_scheduling=True) as llm:
        outputs = llm.generate(requests, params, use_tqdm=False)
        engine = llm.engine
        assert overlapped_steps(engine) > 0 and engine.scheduler.num_preemptions > 0
        assert_all_blocks_free(engine)
        for request, out in zip(requests, outputs):
            processed = llm.processor.process_prompt(request)
            mm = {}
            if processed.images:
                mm = dict(
                    pixel_values=torch.cat([img.pixel_values for img in processed.images]),
                    image_grid_thw=torch.tensor([img.grid_thw for img in processed.images]),
                )
            expected, logprobs = hf_greedy(hf, processed.prompt_token_ids, params.max_tokens, **mm)
            assert out.outputs[0].token_ids == expected
            assert_logprobs_match(out.outputs[0].logprobs, expected, logprobs)


def test_a_decode_instance_decodes_hand_offs_with_overlap_and_the_sync_tokens(setup):
    """Prefilled on one engine, handed off (KV injected: a synchronous step) to a decode-only engine,
    whose decodes then overlap; a prefill engine (it hands off) never launches ahead."""
    config, processor = setup
    handed: list = []
    prefill = LLMEngine(
        replace(config, async_scheduling=True),
        processor.tokenizer,
        handoff=lambda r, kv: handed.append((r, kv)),
    )
    params = [SamplingParams(temperature=0, max_tokens=6 + 5 * i, logprobs=1) for i in range(3)]
    for i, p in enumerate(params):
        prefill.add_request(f"r{i}", processor.process_prompt(prompt(i, 14 + i)), p)
    while prefill.has_unfinished_requests():
        prefill.step()
    assert len(handed) == 3 and overlapped_steps(prefill) == 0
    done = {}
    for async_on in (False, True):
        decode = LLMEngine(
            replace(config, async_scheduling=async_on), processor.tokenizer, encode_locally=False
        )
        for req, kv in handed:
            first = req.output_token_ids[0]
            decode.add_handoff(req.request_id, req.prompt, req.params, first, req.output_logprobs[0], kv)
        while decode.has_unfinished_requests():
            for out in decode.step():
                if out.finished:
                    done[async_on, out.request_id] = (out.outputs[0].token_ids, out.outputs[0].finish_reason)
        assert_all_blocks_free(decode)
    assert all(done[True, rid] == done[False, rid] for rid in ("r0", "r1", "r2"))
    assert overlapped_steps(decode) > 0


# ---- the scheduler's continuation ----------------------------------------------------------------


def decoding(scheduler: Scheduler, *lengths: int) -> list[Request]:
    """Requests prefilled and holding one sampled token each, as after a synchronous step, then
    with that token in flight: computed, and a placeholder appended (what the engine does)."""
    requests = []
    for i, n in enumerate(lengths):
        request = Request(f"r{i}", ProcessedPrompt(list(range(1, n + 1)), [], []), SamplingParams(), 2)
        scheduler.add(request)
        requests.append(request)
    batch = scheduler.schedule()
    for request, n in zip(batch.requests, batch.num_new_tokens):
        request.num_computed_tokens += n
        request.output_token_ids.append(PLACEHOLDER)
    return requests


def test_a_continuation_gives_each_request_in_flight_its_next_token_in_running_order():
    scheduler = Scheduler(BlockManager(20, 4), max_num_seqs=8, max_num_batched_tokens=64)
    first, second, third = decoding(scheduler, 4, 6, 3)
    batch = scheduler.schedule_continuation([third, first], [first, second, third])
    assert batch.requests == [first, third] and batch.num_new_tokens == [1, 1] and all(batch.samples)
    # first's token 4 opens a new block; third's token 3 still fits its first one.
    assert len(scheduler.blocks.block_table("r0")) == 2 and len(scheduler.blocks.block_table("r2")) == 1


def test_a_continuation_is_refused_where_schedule_could_decide_otherwise():
    scheduler = Scheduler(BlockManager(20, 4), max_num_seqs=8, max_num_batched_tokens=64)
    first, second, third = decoding(scheduler, 4, 6, 3)
    flying = [first, second, third]
    assert scheduler.schedule_continuation([first, second], [first, second]) is None  # third not in flight
    scheduler.max_num_batched_tokens = 2
    assert scheduler.schedule_continuation(flying, flying) is None  # 3 tokens, a budget of 2
    scheduler.max_num_batched_tokens = 64
    scheduler.add(Request("new", ProcessedPrompt([5, 6], [], []), SamplingParams(), 2))
    assert scheduler.schedule_continuation(flying, flying) is None  # a waiting request: admission
    scheduler.waiting.clear()
    assert scheduler.schedule_continuation(flying, flying) is not None


def test_a_continuation_short_of_blocks_is_refused_and_takes_none():
    blocks = BlockManager(5, 4)  # r0: 1 block, r1: 2; 2 left, and both need a new one
    scheduler = Scheduler(blocks, max_num_seqs=8, max_num_batched_tokens=64)
    flying = decoding(scheduler, 4, 8)
    blocks.allocate_prompt("hog", [9] * 4)  # 1 left
    tables = [blocks.block_table(r.request_id) for r in flying]
    assert scheduler.schedule_continuation(flying, flying) is None
    assert [blocks.block_table(r.request_id) for r in flying] == tables and blocks.num_free_blocks == 1


# ---- what may not run async ---------------------------------------------------------------------


def test_a_scripted_runner_refuses_async_scheduling(setup):
    config, processor = setup
    config: EngineConfig = replace(config, async_scheduling=True)
    with pytest.raises(ValueError, match="needs a runner that launches steps on a device"):
        LLMEngine(config, processor.tokenizer, model_parts=scripted_parts)


def test_the_cli_flag_turns_it_on_and_it_is_off_by_default():
    from epd.cli import build_parser, engine_option_value
    from epd.entrypoints.options import engine_options

    [field] = [f for f in engine_options() if f.name == "async_scheduling"]
    parser = build_parser()
    on = parser.parse_args(["serve", "--model", "m", "--async-scheduling"])
    off = parser.parse_args(["serve", "--model", "m"])
    assert engine_option_value(on, field) is True
    assert engine_option_value(off, field) is False
    assert EngineArgs(model="m", async_scheduling=True).async_scheduling is True


@pytest.mark.parametrize("seed", range(6))
def test_random_mixes_of_every_kind_give_the_sync_outputs(setup, seed):
    """Stops of every kind, seeded and unseeded sampling, logprobs, arrivals, aborts, small caches
    and budgets, together."""
    run_random_mix(setup, seed)
