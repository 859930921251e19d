"""Sampler: greedy, seeded reproducibility, each mask against an independent reference, logprobs."""

from __future__ import annotations

import math

import pytest
import torch

from epd.engine.sampler import Sampler
from epd.sampling_params import SamplingParams

sampler = Sampler()


def gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def draw_many(logits_row: torch.Tensor, params: SamplingParams, n: int = 2000, seed: int = 0) -> set[int]:
    """The distinct tokens of `n` draws for one row (one batch of n copies, one shared generator)."""
    g = gen(seed)
    out = sampler(logits_row.expand(n, -1), [params] * n, [g] * n)
    return set(out.token_ids)


def distinct_logits(vocab: int, seed: int = 0) -> torch.Tensor:
    """A row with no ties, so the top-k set is well defined."""
    return torch.randperm(vocab, generator=gen(seed)).float() / 4


# ---- greedy -----------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_greedy_equals_argmax(dtype):
    logits = torch.randn(6, 50, generator=gen(1)).to(dtype)
    logits[2, 7] = logits[2, 30] = logits[2].max() + 1  # a tie: the first index wins
    params = [SamplingParams(temperature=0.0)] * 3 + [SamplingParams(top_k=1)] * 3
    out = sampler(logits, params, [None] * 6)
    assert out.token_ids == torch.argmax(logits.float(), dim=-1).tolist()
    assert out.token_ids[2] == 7
    assert out.logprobs == [None] * 6


def test_greedy_and_sampled_rows_mix_in_one_batch():
    logits = torch.randn(4, 30, generator=gen(2))
    params = [
        SamplingParams(temperature=0),
        SamplingParams(seed=1),
        SamplingParams(top_k=1),
        SamplingParams(),
    ]
    out = sampler(logits, params, [None, gen(1), None, gen(2)])
    assert out.token_ids[0] == logits[0].argmax().item() and out.token_ids[2] == logits[2].argmax().item()
    assert all(0 <= t < 30 for t in out.token_ids)


def test_rejects_mismatched_lengths():
    with pytest.raises(ValueError):
        sampler(torch.randn(2, 5), [SamplingParams()], [None, None])


# ---- seeds ------------------------------------------------------------------------------------


def test_seeded_rows_are_reproducible_whatever_else_is_in_the_batch():
    vocab, steps = 40, 30
    row = torch.randn(vocab, generator=gen(3))
    mine = SamplingParams(temperature=1.3, seed=42)
    alone, g = [], gen(42)
    for _ in range(steps):
        alone.append(sampler(row.unsqueeze(0), [mine], [g]).token_ids[0])
    # Same request batched with neighbours that use every other feature, at a different row index.
    others = [
        SamplingParams(temperature=0.0),
        SamplingParams(top_k=3, top_p=0.5, logprobs=2),
        SamplingParams(min_p=0.2),
        SamplingParams(temperature=0.7, seed=7),
    ]
    shared, g, g7, noise = [], gen(42), gen(7), gen(0)
    for _ in range(steps):
        logits = torch.cat([torch.randn(2, vocab, generator=noise), row.unsqueeze(0), torch.randn(2, vocab)])
        params = [others[0], others[1], mine, others[2], others[3]]
        shared.append(sampler(logits, params, [None, None, g, None, g7]).token_ids[2])
    assert shared == alone


def test_different_seeds_differ():
    row = torch.zeros(1, 100)  # uniform: every draw is informative

    def run(seed: int) -> list[int]:
        g = gen(seed)
        return [sampler(row, [SamplingParams(seed=seed)], [g]).token_ids[0] for _ in range(50)]

    assert run(1) == run(1)
    assert run(1) != run(2)


def test_unmasked_sampling_follows_the_tempered_distribution():
    logits = torch.tensor([2.0, 1.0, 0.0, -1.0])
    n, temperature = 8000, 2.0
    out = sampler(logits.expand(n, -1), [SamplingParams(temperature=temperature)] * n, [gen(5)] * n)
    freq = torch.bincount(torch.tensor(out.token_ids), minlength=4).double() / n
    expected = torch.softmax(logits.double() / temperature, dim=-1)
    assert torch.allclose(freq, expected, atol=0.02)


# ---- masks, each checked against an independent float64 reference ----------------------------


def test_top_k_only_ever_samples_the_k_best():
    logits = distinct_logits(30)
    seen = draw_many(logits, SamplingParams(temperature=5.0, top_k=5))
    assert seen == set(torch.topk(logits, 5).indices.tolist())  # all of them, and nothing else


def nucleus(probs: list[float], top_p: float) -> set[int]:
    """Smallest set of most likely tokens whose mass reaches top_p (plain Python reference)."""
    order = sorted(range(len(probs)), key=lambda i: -probs[i])
    kept, mass = set(), 0.0
    for i in order:
        kept.add(i)
        mass += probs[i]
        if mass >= top_p:
            break
    return kept


@pytest.mark.parametrize("top_p", [0.3, 0.6, 0.9])
def test_top_p_never_samples_outside_the_nucleus(top_p):
    logits = distinct_logits(20, seed=4)
    temperature = 3.0
    probs = torch.softmax(logits.double() / temperature, dim=-1).tolist()
    allowed = nucleus(probs, top_p)
    assert 1 < len(allowed) < 20
    seen = draw_many(logits, SamplingParams(temperature=temperature, top_p=top_p))
    assert seen == allowed


def test_top_p_keeps_the_top_token_even_when_it_alone_exceeds_top_p():
    logits = torch.tensor([5.0, 0.0, 0.0, 0.0])
    assert draw_many(logits, SamplingParams(top_p=0.01), n=200) == {0}


def test_top_k_then_top_p():
    logits = distinct_logits(20, seed=6)
    temperature, k, top_p = 3.0, 8, 0.5
    top = torch.topk(logits, k).indices.tolist()
    renorm = torch.softmax(logits[top].double() / temperature, dim=-1).tolist()
    allowed = {top[i] for i in nucleus(renorm, top_p)}
    assert 1 < len(allowed) < k
    assert draw_many(logits, SamplingParams(temperature=temperature, top_k=k, top_p=top_p)) == allowed


def test_min_p_drops_tokens_below_the_fraction_of_the_max():
    logits = distinct_logits(20, seed=8)
    temperature, min_p = 3.0, 0.4
    probs = torch.softmax(logits.double() / temperature, dim=-1)
    allowed = set(torch.nonzero(probs >= min_p * probs.max()).flatten().tolist())
    assert 1 < len(allowed) < 20
    assert draw_many(logits, SamplingParams(temperature=temperature, min_p=min_p)) == allowed


@pytest.mark.parametrize("temperature", [1e-2, 1e-3, 1e-4, 1e-6])
def test_low_temperature_approaches_greedy(temperature):
    logits = distinct_logits(50, seed=9)  # neighbouring logits differ by 0.25
    assert draw_many(logits, SamplingParams(temperature=temperature), n=500) == {int(logits.argmax())}


# ---- logprobs ---------------------------------------------------------------------------------


def test_logprobs_match_log_softmax_of_raw_logits_with_ranks():
    vocab = 64
    logits = torch.randn(4, vocab, generator=gen(10)).to(torch.bfloat16)
    params = [
        SamplingParams(temperature=0.0, logprobs=5),
        SamplingParams(temperature=0.5, top_k=10, logprobs=0),  # only the sampled token
        SamplingParams(),  # no logprobs
        SamplingParams(temperature=2.0, logprobs=20),
    ]
    out = sampler(logits, params, [None, gen(1), gen(2), gen(3)])
    ref = torch.log_softmax(logits.float(), dim=-1)
    assert out.logprobs[2] is None
    for row, k in [(0, 5), (1, 0), (3, 20)]:
        entry = out.logprobs[row]
        token = out.token_ids[row]
        expected_ids = set(torch.topk(ref[row], k).indices.tolist()) | {token}
        assert set(entry) == expected_ids
        for tid, lp in entry.items():
            assert lp.logprob == pytest.approx(ref[row, tid].item(), abs=1e-6)
            assert lp.rank == 1 + int((ref[row] > ref[row, tid]).sum())
        assert next(iter(entry)) == token  # the sampled token comes first
    assert out.logprobs[0][out.token_ids[0]].rank == 1


def test_sampled_token_gets_its_real_rank_outside_the_top_alternatives():
    logits = torch.zeros(1, 30)
    logits[0, :3] = torch.tensor([3.0, 2.0, 1.0])
    p = SamplingParams(temperature=10.0, logprobs=2, seed=0)  # hot: mostly samples the flat tail
    g = gen(0)
    for _ in range(20):
        out = sampler(logits, [p], [g])
        token, entry = out.token_ids[0], out.logprobs[0]
        if token >= 3:
            assert entry[token].rank == 4  # 3 tokens are strictly more likely; the tail ties
            assert {t: lp.rank for t, lp in entry.items() if t != token} == {0: 1, 1: 2}
            assert len(entry) == 3
            return
    pytest.fail("never sampled outside the top 3")


def test_tied_logprobs_share_a_rank():
    logits = torch.tensor([[1.0, 1.0, 0.0]])
    out = sampler(logits, [SamplingParams(temperature=0, logprobs=3)], [None])
    assert {t: lp.rank for t, lp in out.logprobs[0].items()} == {0: 1, 1: 1, 2: 3}
    assert math.isclose(out.logprobs[0][0].logprob, out.logprobs[0][1].logprob)
