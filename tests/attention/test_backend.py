"""Paged attention against plain causal attention on the unpaged sequences."""

from __future__ import annotations

import random

import pytest
import torch
from torch.nn import functional as F

from epd.attention.backend import TorchSDPABackend
from epd.attention.context import AttentionMetadata, forward_context, get_forward_context


def _reference(q, k, v, scale):
    """Causal attention written out: softmax(q k^T) v with queries at the end of the sequence."""
    groups = q.shape[1] // k.shape[1]
    k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
    scores = torch.einsum("qhd,khd->hqk", q, k) * scale
    offset = k.shape[0] - q.shape[0]
    mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(offset)
    return torch.einsum("hqk,khd->qhd", F.softmax(scores.masked_fill(~mask, float("-inf")), -1), v)


def test_paged_attention_matches_reference():
    rng = random.Random(0)
    torch.manual_seed(0)
    heads, kv_heads, dim, block, num_blocks = 4, 2, 8, 4, 64
    cache = torch.zeros(2, num_blocks, block, kv_heads, dim)
    free = list(range(num_blocks))
    rng.shuffle(free)  # blocks scattered, not contiguous
    seqs = []
    for _ in range(5):  # each: some tokens already cached, some new this step
        cached, new = rng.randint(0, 9), rng.randint(1, 6)
        total = cached + new
        table = [free.pop() for _ in range((total + block - 1) // block)]
        k, v = torch.randn(total, kv_heads, dim), torch.randn(total, kv_heads, dim)
        slots = [table[i // block] * block + i % block for i in range(total)]
        cache[0].view(-1, kv_heads, dim)[slots[:cached]] = k[:cached]
        cache[1].view(-1, kv_heads, dim)[slots[:cached]] = v[:cached]
        seqs.append((cached, new, table, torch.randn(new, heads, dim), k, v, slots))
    starts = [0]
    for s in seqs[:-1]:
        starts.append(starts[-1] + s[1])
    meta = AttentionMetadata(
        slot_mapping=torch.tensor([slot for s in seqs for slot in s[6][s[0] :]]),
        query_starts=starts,
        query_lens=[s[1] for s in seqs],
        seq_lens=[s[0] + s[1] for s in seqs],
        block_tables=[s[2] for s in seqs],
        block_size=block,
    )
    q = torch.cat([s[3] for s in seqs])
    k_new = torch.cat([s[4][s[0] :] for s in seqs])
    v_new = torch.cat([s[5][s[0] :] for s in seqs])
    out = TorchSDPABackend().forward(q, k_new, v_new, cache, meta, dim**-0.5)
    for start, (_, new, _, sq, k, v, _) in zip(starts, seqs):
        torch.testing.assert_close(
            out[start : start + new], _reference(sq, k, v, dim**-0.5), atol=1e-5, rtol=1e-5
        )


def test_forward_context_refuses_nesting_and_stale_use():
    meta = AttentionMetadata(torch.tensor([0]), [0], [1], [1], [[0]], 1)
    with forward_context(meta):
        assert get_forward_context().metadata is meta
        with pytest.raises(RuntimeError, match="twice"), forward_context(meta):
            pass
    with pytest.raises(RuntimeError, match="no forward context"):
        get_forward_context()
