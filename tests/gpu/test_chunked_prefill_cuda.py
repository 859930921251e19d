"""Chunked prefill on the GPU: the token-exact suite of
tests/entrypoints/test_chunked_prefill_vs_hf.py with every engine on CUDA (Triton kernels: chunks
go through the prefill kernel over cached context, decodes through CUDA graphs), and a check that
steps holding a prompt chunk never replay a decode graph.
"""

from __future__ import annotations

from epd import LLM, SamplingParams
from tests.gpu.cpu_suite import ON_CUDA, collected_from, load_suite

pytestmark = ON_CUDA

_suite = load_suite("entrypoints/test_chunked_prefill_vs_hf.py")
hf = _suite.hf  # the fixture
globals().update(collected_from(_suite))


def test_steps_with_a_prompt_chunk_run_eagerly_and_decodes_replay_graphs(checkpoint):
    prompts = _suite.suite.mixed_prompts(8, seed=11)
    params = SamplingParams(temperature=0, max_tokens=16, logprobs=2, ignore_eos=True)
    with LLM(str(checkpoint), max_num_seqs=8, max_num_batched_tokens=32) as llm:
        runner = llm.engine.runner
        assert runner.graphs is not None
        steps: list[list[bool]] = []  # per step: [has a prompt chunk, replayed a graph]
        run, replay = runner.run, runner.graphs.run

        def logged_run(batch, tables, after_layer=None):
            chunk = any(r.num_computed_tokens < r.num_prompt_tokens for r in batch.requests)
            steps.append([chunk, False])
            return run(batch, tables, after_layer)

        def logged_replay(*args, **kwargs):
            steps[-1][1] = True
            return replay(*args, **kwargs)

        runner.run, runner.graphs.run = logged_run, logged_replay
        chunked = llm.generate(prompts, params, use_tqdm=False)
    assert not any(chunk and graphed for chunk, graphed in steps)
    assert any(graphed for _, graphed in steps) and sum(chunk for chunk, _ in steps) > 4
    with LLM(str(checkpoint), max_num_seqs=8, enable_chunked_prefill=False) as llm:
        whole = llm.generate(prompts, params, use_tqdm=False)
    for c, w in zip(chunked, whole):
        assert c.outputs[0].token_ids == w.outputs[0].token_ids
        for token, pos_c, pos_w in zip(c.outputs[0].token_ids, c.outputs[0].logprobs, w.outputs[0].logprobs):
            assert abs(pos_c[token].logprob - pos_w[token].logprob) < 1e-4
