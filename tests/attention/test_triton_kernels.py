"""The Triton attention kernels against plain float64 attention on random paged batches.

Runs on a CUDA GPU; on a CPU only under Triton's interpreter (`TRITON_INTERPRET=1`, with
triton installed), on smaller shapes. Skipped otherwise (CI has neither).
Bars (relative Frobenius error): float32 < 1e-5, bfloat16 < 1e-2.
"""

from __future__ import annotations

import importlib.util
import os
import random

import pytest
import torch

from epd.attention.backend import TorchSDPABackend, get_attention_backend, write_kv
from epd.attention.context import AttentionMetadata, build_device_metadata

CUDA = torch.cuda.is_available()
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("triton") is None or not (CUDA or INTERPRET),
    reason="needs a CUDA GPU with triton (or TRITON_INTERPRET=1)",
)
DEVICE = torch.device("cuda" if CUDA else "cpu")
BAR = {torch.float32: 1e-5, torch.bfloat16: 1e-2, torch.float16: 1e-2}
# The interpreter mistakes bfloat16 bits (numpy has no such type): float16 stands in there.
DTYPES = [torch.float32, torch.bfloat16 if CUDA else torch.float16]
# (heads, kv_heads, head_dim): Qwen2.5-VL-7B's, other GQA ratios, MHA, a non-power-of-2 dim.
SHAPES = [(28, 4, 128), (4, 2, 16), (8, 8, 64), (16, 1, 32), (6, 2, 80)]
SCALE_UP = 4 if CUDA else 1  # longer contexts on the GPU


class PagedBatch:
    """Random sequences whose first `cached` tokens are already in a shuffled paged cache."""

    def __init__(self, lens, heads, kv_heads, dim, block, dtype, seed):
        rng = random.Random(seed)
        gen = torch.Generator().manual_seed(seed)
        blocks_needed = sum(-(-(c + n) // block) for c, n in lens)
        self.num_blocks = blocks_needed + 3
        free = list(range(self.num_blocks))
        rng.shuffle(free)  # blocks scattered, not contiguous
        self.cache = torch.randn(2, self.num_blocks, block, kv_heads, dim, generator=gen).to(DEVICE, dtype)
        self.block, self.lens, self.dtype = block, lens, dtype
        self.tables, self.k, self.v, self.q, slots = [], [], [], [], []
        for cached, new in lens:
            total = cached + new
            table = [free.pop() for _ in range(-(-total // block))]
            k = torch.randn(total, kv_heads, dim, generator=gen).to(DEVICE, dtype)
            v = torch.randn(total, kv_heads, dim, generator=gen).to(DEVICE, dtype)
            seq_slots = [table[i // block] * block + i % block for i in range(total)]
            flat = self.cache.view(2, -1, kv_heads, dim)
            flat[0, seq_slots[:cached]] = k[:cached]
            flat[1, seq_slots[:cached]] = v[:cached]
            self.tables.append(table)
            self.k.append(k)
            self.v.append(v)
            self.q.append(torch.randn(new, heads, dim, generator=gen).to(DEVICE, dtype))
            slots += seq_slots[cached:]
        query_lens = [n for _, n in lens]
        starts = [sum(query_lens[:i]) for i in range(len(lens))]
        self.meta = AttentionMetadata(
            slot_mapping=torch.tensor(slots, device=DEVICE),
            query_starts=starts,
            query_lens=query_lens,
            seq_lens=[c + n for c, n in lens],
            block_tables=self.tables,
            block_size=block,
        )

    def new_kv(self) -> tuple[torch.Tensor, torch.Tensor]:
        return (
            torch.cat([k[c:] for k, (c, _) in zip(self.k, self.lens)]),
            torch.cat([v[c:] for v, (c, _) in zip(self.v, self.lens)]),
        )

    def reference(self, scale: float) -> torch.Tensor:
        """Causal attention in float64 on the CPU, each sequence on its own."""
        outs = []
        for q, k, v in zip(self.q, self.k, self.v):
            q, k, v = (t.cpu().double() for t in (q, k, v))
            groups = q.shape[1] // k.shape[1]
            k, v = k.repeat_interleave(groups, 1), v.repeat_interleave(groups, 1)
            scores = torch.einsum("qhd,khd->hqk", q, k) * scale
            mask = torch.ones(q.shape[0], k.shape[0], dtype=torch.bool).tril(k.shape[0] - q.shape[0])
            probs = scores.masked_fill(~mask, float("-inf")).softmax(-1)
            outs.append(torch.einsum("hqk,khd->qhd", probs, v))
        return torch.cat(outs)


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not out.isnan().any(), "NaN (or an unwritten output row) in the kernel's result"
    return ((out.cpu().double() - ref).norm() / ref.norm()).item()


def random_lens(rng: random.Random, n: int, max_cached: int, max_new: int) -> list[tuple[int, int]]:
    return [(rng.randint(0, max_cached), rng.randint(1, max_new)) for _ in range(n)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [16, 1])
@pytest.mark.parametrize("splits", [1, 5])
@pytest.mark.parametrize("wide", [False, True], ids=["tiles64", "tiles128"])
def test_decode_kernel(dtype, shape, block, splits, wide):
    from epd.attention.triton_decode import DecodeLaunch, paged_decode_attention

    # the wide shape (128-key tiles, 8 warps, 4 stages) is what `choose_launch` picks at ~64 seqs
    launch = DecodeLaunch(block_n=128, num_warps=8, num_stages=4) if wide else None

    heads, kv_heads, dim = shape
    rng = random.Random(hash((shape, block, splits)) % 1000)
    lens = [(c, 1) for c, _ in random_lens(rng, rng.randint(1, 9), 300 * SCALE_UP, 1)]
    batch = PagedBatch(lens, heads, kv_heads, dim, block, dtype, seed=rng.randint(0, 10**6))
    k_new, v_new = batch.new_kv()
    write_kv(k_new, v_new, batch.cache, batch.meta.slot_mapping)
    t = build_device_metadata(batch.meta.query_lens, batch.meta.seq_lens, batch.tables, DEVICE)
    q = torch.cat(batch.q)
    out = torch.full_like(q, float("nan"))  # poisoned: every element must be written
    k_cache, v_cache = batch.cache
    paged_decode_attention(q, k_cache, v_cache, t.block_tables, t.seq_lens, dim**-0.5, splits, out, launch)
    assert rel_err(out, batch.reference(dim**-0.5)) < BAR[dtype]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("block", [16, 4])
def test_prefill_kernel_with_prefix_hits_and_mixed_decodes(dtype, shape, block):
    from epd.attention.triton_prefill import paged_prefill_attention

    heads, kv_heads, dim = shape
    rng = random.Random(hash((shape, block)) % 1000)
    lens = random_lens(rng, rng.randint(1, 6), 100 * SCALE_UP, 150 * SCALE_UP)
    lens += [(0, rng.randint(1, 200)), (rng.randint(1, 50), 1)]  # a fresh prompt, a decode
    batch = PagedBatch(lens, heads, kv_heads, dim, block, dtype, seed=rng.randint(0, 10**6))
    k_new, v_new = batch.new_kv()
    write_kv(k_new, v_new, batch.cache, batch.meta.slot_mapping)
    t = build_device_metadata(batch.meta.query_lens, batch.meta.seq_lens, batch.tables, DEVICE)
    q = torch.cat(batch.q)
    out = torch.full_like(q, float("nan"))
    paged_prefill_attention(
        q, batch.cache[0], batch.cache[1], t.block_tables, t.query_starts, t.seq_lens,
        batch.meta.query_lens, dim**-0.5, out,
    )  # fmt: skip
    assert rel_err(out, batch.reference(dim**-0.5)) < BAR[dtype]


@pytest.mark.parametrize("decode", [True, False])
def test_backend_matches_torch_sdpa_backend(decode):
    """Through the backend interface, K/V write included, against the reference backend."""
    rng = random.Random(int(decode))
    lens = [(c, 1 if decode else n) for c, n in random_lens(rng, 5, 120, 40)]
    batch = PagedBatch(lens, 28, 4, 128, 16, torch.float32, seed=7)
    k_new, v_new = batch.new_kv()
    q = torch.cat(batch.q)
    cache_ref = batch.cache.clone()
    ref = TorchSDPABackend().forward(q, k_new, v_new, cache_ref, batch.meta, 128**-0.5)
    out = get_attention_backend("auto" if CUDA else "triton", DEVICE).forward(
        q, k_new, v_new, batch.cache, batch.meta, 128**-0.5
    )
    torch.testing.assert_close(batch.cache, cache_ref, rtol=0, atol=0)
    assert rel_err(out, ref.cpu().double()) < 1e-5


@pytest.mark.skipif(not CUDA, reason="long fresh prompts take torch SDPA on CUDA only")
def test_backend_mixes_sdpa_prompts_with_kernel_rows():
    """Long prompts with nothing cached (SDPA), a prefix hit and a decode (Triton) in one step."""
    lens = [(0, 700), (40, 30), (0, 530), (100, 1)]
    batch = PagedBatch(lens, 28, 4, 128, 16, torch.bfloat16, seed=3)
    k_new, v_new = batch.new_kv()
    q = torch.cat(batch.q)
    out = get_attention_backend("triton").forward(q, k_new, v_new, batch.cache, batch.meta, 128**-0.5)
    assert rel_err(out, batch.reference(128**-0.5)) < BAR[torch.bfloat16]
