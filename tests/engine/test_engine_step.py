"""The engine's per-step host shortcuts change nothing observable: text read through `step()`,
final text, and the prefix cache's registrations are as before."""

from __future__ import annotations

import pytest

from epd import LLM, SamplingParams
from epd.engine.llm_engine import LLMEngine
from epd.engine.scheduler import ScheduledBatch

PROMPT = {"prompt_token_ids": list(range(10, 41))}  # 31 tokens: decodes cross block boundaries


def _always_commit(self: LLMEngine, batch: ScheduledBatch) -> None:
    """The engine before the shortcut: commit every request at every step."""
    for req, n in zip(batch.requests, batch.num_new_tokens):
        req.num_computed_tokens += n
        self.block_manager.commit(
            req.request_id, req.all_token_ids, req.prompt.mm_spans, req.num_computed_tokens
        )


def _registered_after(checkpoint, monkeypatch, always_commit: bool) -> tuple[list, int, int]:
    if always_commit:
        monkeypatch.setattr(LLMEngine, "_advance_computed", _always_commit)
    params = SamplingParams(temperature=0, max_tokens=21, ignore_eos=True)
    with LLM(str(checkpoint), block_size=4, max_num_seqs=4) as llm:
        first = llm.generate([PROMPT] * 2, params, use_tqdm=False)
        tokens = PROMPT["prompt_token_ids"] + first[0].outputs[0].token_ids
        [again] = llm.generate([{"prompt_token_ids": tokens}], params, use_tqdm=False)
        blocks = llm.engine.block_manager
        return [o.outputs[0].token_ids for o in first], again.num_cached_tokens, blocks.num_cached_blocks


def test_commit_at_block_boundaries_registers_what_committing_every_step_did(checkpoint, monkeypatch):
    shortcut = _registered_after(checkpoint, monkeypatch, always_commit=False)
    every_step = _registered_after(checkpoint, monkeypatch, always_commit=True)
    assert shortcut == every_step
    # The generated tokens' full blocks were registered: the follow-up hits all but the last block.
    assert shortcut[1] == (31 + 21 - 1) // 4 * 4


@pytest.mark.parametrize("stop", [[], ["xyz-never"]])
def test_step_outputs_carry_incremental_text_and_final_text(checkpoint, stop):
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, stop=stop)
    with LLM(str(checkpoint)) as llm:
        engine, decode = llm.engine, llm.engine.tokenizer.decode
        engine.add_request("r", llm.processor.process_prompt(PROMPT), params)
        texts = []
        while engine.has_unfinished_requests():
            [out] = engine.step()
            texts.append(out.outputs[0].text)
        ids = out.outputs[0].token_ids
        assert texts[-1] == decode(ids, True)
        for n, text in enumerate(texts[:-1], start=1):
            assert decode(ids[:n], True).startswith(text)


def test_step_requests_leaves_text_until_finished(checkpoint):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    with LLM(str(checkpoint)) as llm:
        engine = llm.engine
        req = engine.add_request("r", llm.processor.process_prompt(PROMPT), params)
        engine.step_requests()
        assert req.output_text == ""  # nobody read it: not decoded yet
        while engine.has_unfinished_requests():
            engine.step_requests()
        assert req.output_text == engine.tokenizer.decode(req.output_token_ids, True)


def test_graph_sizes_stop_at_the_first_that_holds_max_num_seqs():
    from epd.engine.cuda_graphs import DEFAULT_SIZES, graph_sizes

    assert graph_sizes(16) == (1, 2, 4, 8, 16)
    assert graph_sizes(17) == (1, 2, 4, 8, 16, 24)
    assert graph_sizes(None) == graph_sizes(256) == graph_sizes(1000) == DEFAULT_SIZES


def test_host_tables_rewrite_only_what_changed_and_stay_right():
    """Rows follow the tables through growth, shifts (a request finishing) and padding."""
    import random

    from epd.engine.cuda_graphs import HostTables

    rng = random.Random(0)
    scratch, host = 999, HostTables(8, 12, 999)
    tables = [[rng.randrange(500) for _ in range(rng.randrange(1, 6))] for _ in range(6)]
    for _ in range(200):
        action = rng.random()
        if action < 0.6:  # decodes: some tables take a block
            for t in tables:
                if rng.random() < 0.3 and len(t) < 12:
                    t.append(rng.randrange(500))
        elif action < 0.8 and len(tables) > 1:  # a request finishes: later rows shift
            tables.pop(rng.randrange(len(tables)))
        elif len(tables) < 8:  # a new request
            tables.insert(rng.randrange(len(tables) + 1), [rng.randrange(500)])
        size = min(8, len(tables) + rng.randrange(3))
        array = host.fill(tables, size)
        for i, t in enumerate(tables):
            assert array[i, : len(t)].tolist() == t
        assert all(array[i, 0] == scratch for i in range(len(tables), size))
