"""Decode attention over the paged KV cache: one query token per sequence, Triton, split-K.

Hot path, GPU only (imported by the Triton backend, never on a CPU-only install).

Grid: (sequence, kv_head, split). One program serves every query head of its KV head's
group (GQA), so each K/V row is read from memory once per group, not once per head: the
group's heads are the M dimension of the tile product, padded to 16 for the tensor cores.
A long context is cut into `num_splits` chunks handled by separate programs (split-K,
"flash-decoding") so that small batches still fill the GPU; a second kernel merges the
chunks' partial results by their log-sum-exp. With one split the first kernel writes the
output directly.

    partial_i = softmax-weighted V over chunk i        lse_i = log2 sum exp2(s) over chunk i
    out = sum_i 2^(lse_i - m) * partial_i / sum_i 2^(lse_i - m),  m = max_i lse_i

Scores are kept in base 2 (the scale is pre-multiplied by log2 e) because exp2 is the
native instruction. Empty chunks (a sequence shorter than the split grid assumes, as in
a CUDA graph captured for the longest context) report lse = -inf and weigh nothing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import triton
import triton.language as tl

from epd.attention.triton_common import attend_chunk

LOG2E = 1.4426950408889634


@dataclass(frozen=True)
class DecodeLaunch:
    """The partial kernel's tile and launch shape (epd.bench.decode_attention_tune compares them)."""

    block_n: int = 64  # keys per tile
    num_warps: int = 4
    num_stages: int = 2


@triton.jit
def _decode_partial_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    seq_lens_ptr,
    out_ptr,
    part_out_ptr,
    part_lse_ptr,
    qk_scale,
    num_splits,
    stride_qt,
    stride_qh,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    stride_table,
    stride_ot,
    stride_oh,
    GROUP: tl.constexpr,
    GROUP_PAD: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    SPLIT: tl.constexpr,
    IEEE: tl.constexpr,
):
    seq = tl.program_id(0)
    kv_head = tl.program_id(1)
    split = tl.program_id(2)
    num_heads = tl.num_programs(1) * GROUP
    seq_len = tl.load(seq_lens_ptr + seq)
    chunk = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * chunk
    end = tl.minimum(start + chunk, seq_len)

    g = tl.arange(0, GROUP_PAD)
    d = tl.arange(0, DIM_PAD)
    heads = kv_head * GROUP + g
    g_ok = g < GROUP
    d_ok = d < HEAD_DIM
    q = tl.load(
        q_ptr + seq * stride_qt + heads[:, None] * stride_qh + d[None, :],
        mask=g_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    m_i = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l_i = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, DIM_PAD], tl.float32)
    table_row = tables_ptr + seq * stride_table
    for n0 in range(start, end, BLOCK_N):
        acc, m_i, l_i = attend_chunk(
            q, acc, m_i, l_i, n0, end, m_i, k_ptr, v_ptr, table_row, kv_head,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, qk_scale, d, d_ok,
            PAGE=PAGE, BLOCK_N=BLOCK_N, CHECK_END=True, CAUSAL=False, IEEE=IEEE,
        )  # fmt: skip
    has = l_i > 0.0
    result = acc / tl.where(has, l_i, 1.0)[:, None]
    if SPLIT:
        row = (seq * num_heads + heads) * num_splits + split
        tl.store(part_lse_ptr + row, tl.where(has, m_i + tl.log2(l_i), float("-inf")), mask=g_ok)
        tl.store(part_out_ptr + row[:, None] * DIM_PAD + d[None, :], result, mask=g_ok[:, None])
    else:
        out = out_ptr + seq * stride_ot + heads[:, None] * stride_oh + d[None, :]
        tl.store(out, result.to(out_ptr.dtype.element_ty), mask=g_ok[:, None] & d_ok[None, :])


@triton.jit
def _decode_combine_kernel(
    part_out_ptr,
    part_lse_ptr,
    out_ptr,
    num_splits,
    stride_ot,
    stride_oh,
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    SPLITS_PAD: tl.constexpr,
):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    row0 = (seq * tl.num_programs(1) + head) * num_splits
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, DIM_PAD)
    s_ok = s < num_splits
    lse = tl.load(part_lse_ptr + row0 + s, mask=s_ok, other=float("-inf"))
    m = tl.max(lse, 0)
    w = tl.where(s_ok & (lse > float("-inf")), tl.exp2(lse - m), 0.0)
    parts = tl.load(part_out_ptr + (row0 + s)[:, None] * DIM_PAD + d[None, :], mask=s_ok[:, None], other=0.0)
    result = tl.sum(w[:, None] * parts, 0) / tl.sum(w, 0)
    out = out_ptr + seq * stride_ot + head * stride_oh + d
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=d < HEAD_DIM)


def paged_decode_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    seq_lens: torch.Tensor,
    scale: float,
    num_splits: int = 1,
    out: torch.Tensor | None = None,
    launch: DecodeLaunch | None = None,
) -> torch.Tensor:
    """Attention of one query token per sequence over its whole paged context.

    q [seqs, heads, dim] (row i is sequence i's last token); k_cache, v_cache
    [blocks, block_size, kv_heads, dim] (last dim contiguous); block_tables [seqs, width]
    int32; seq_lens [seqs] int32 (>= 1, the new token included). Returns [seqs, heads, dim]
    in q's dtype. Launch shapes depend only on the arguments' shapes and `num_splits`, never
    on their values, so a CUDA graph may capture it.
    """
    seqs, heads, dim = q.shape
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    group = heads // kv_heads
    _check_layout(q, k_cache, v_cache, block_tables, seq_lens)
    dim_pad = triton.next_power_of_2(dim)
    out = torch.empty_like(q) if out is None else out
    split = num_splits > 1
    part_out = part_lse = out  # placeholders when unused
    if split:
        part_out = torch.empty(seqs * heads * num_splits, dim_pad, dtype=torch.float32, device=q.device)
        part_lse = torch.empty(seqs * heads * num_splits, dtype=torch.float32, device=q.device)
    launch = launch or DecodeLaunch(block_n=64 if dim_pad <= 128 else 32)
    _decode_partial_kernel[(seqs, kv_heads, num_splits)](
        q,
        k_cache,
        v_cache,
        block_tables,
        seq_lens,
        out,
        part_out,
        part_lse,
        scale * LOG2E,
        num_splits,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)),
        HEAD_DIM=dim,
        DIM_PAD=dim_pad,
        PAGE=page,
        BLOCK_N=launch.block_n,
        SPLIT=split,
        IEEE=q.dtype == torch.float32,
        num_warps=launch.num_warps,
        num_stages=launch.num_stages,
    )
    if split:
        _decode_combine_kernel[(seqs, heads)](
            part_out,
            part_lse,
            out,
            num_splits,
            out.stride(0),
            out.stride(1),
            HEAD_DIM=dim,
            DIM_PAD=dim_pad,
            SPLITS_PAD=triton.next_power_of_2(num_splits),
            num_warps=4,
        )
    return out


def _check_layout(q, k_cache, v_cache, block_tables, seq_lens) -> None:
    """The kernel indexes these with unit strides: refuse anything else rather than read garbage."""
    inner = (q.stride(2), k_cache.stride(3), v_cache.stride(3), block_tables.stride(1), seq_lens.stride(0))
    if inner != (1, 1, 1, 1, 1):
        raise ValueError(f"paged_decode_attention needs unit inner strides, got {inner}")


# Between these many programs per SM (sequences x KV heads, before splitting), one program per
# sequence and KV head with wide tiles and a deep pipeline reads the cache fastest: H200, 7B heads,
# batch 64 x 1k context 37.9 us against 41.6 for two splits of 64-key tiles, 4k 129 against 133;
# batch 128 and up keep 64-key tiles (67 against 71 us at 1k). `epd.bench.decode_attention_tune`.
_WIDE_TILES_PROGRAMS_PER_SM = (1.5, 3.0)
_WIDE_TILES = DecodeLaunch(block_n=128, num_warps=8, num_stages=4)


def choose_launch(
    num_seqs: int, kv_heads: int, head_dim: int, max_seq_len: int, num_sms: int
) -> tuple[int, DecodeLaunch | None]:
    """(splits, launch shape) for a decode step; None: the default shape for the head size."""
    per_sm = num_seqs * kv_heads / num_sms
    low, high = _WIDE_TILES_PROGRAMS_PER_SM
    if head_dim <= 128 and max_seq_len >= 1024 and low <= per_sm < high:
        return 1, _WIDE_TILES
    return choose_num_splits(num_seqs, kv_heads, max_seq_len, num_sms), None


def choose_num_splits(num_seqs: int, kv_heads: int, max_seq_len: int, num_sms: int) -> int:
    """Chunks per sequence: enough programs for about two waves over the SMs, but no chunk
    shorter than one 64-token tile. At batch 1 a 1k context then takes 16 programs per KV
    head, one tile each: ~5 us a layer on an H200 where 4 chunks of 4 tiles took 10."""
    programs = num_seqs * kv_heads
    wanted = -(-2 * num_sms // programs)
    return max(1, min(wanted, max_seq_len // 64, 64))
