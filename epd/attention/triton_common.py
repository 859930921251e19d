"""The inner step shared by the Triton attention kernels: one chunk of paged keys.

Online softmax (FlashAttention): each program keeps, per query row, the running maximum
score `m`, the running sum of exponentials `l` and the unnormalised output `acc`; a chunk
of BLOCK_N keys updates all three. Scores are base 2 (the caller folds log2 e into the
scale). K/V rows are gathered through the block table: token t lives in block
`table[t // PAGE]`, row `t % PAGE`.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def attend_chunk(
    q,
    acc,
    m_i,
    l_i,
    n0,
    end,
    q_pos,
    k_ptr,
    v_ptr,
    table_row,
    kv_head,
    stride_kb,
    stride_kt,
    stride_kh,
    stride_vb,
    stride_vt,
    stride_vh,
    qk_scale,
    d,
    d_ok,
    PAGE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    CHECK_END: tl.constexpr,
    CAUSAL: tl.constexpr,
    IEEE: tl.constexpr,
):
    """Keys n0 .. n0+BLOCK_N-1 (those < end when CHECK_END; those <= q_pos per row when
    CAUSAL). Returns the updated (acc, m_i, l_i)."""
    tok = n0 + tl.arange(0, BLOCK_N)
    if CHECK_END:
        ok = tok < end
        page = tl.load(table_row + tok // PAGE, mask=ok, other=0).to(tl.int64)
        kv_mask = ok[:, None] & d_ok[None, :]
    else:
        page = tl.load(table_row + tok // PAGE).to(tl.int64)
        kv_mask = d_ok[None, :]
    within = (tok % PAGE).to(tl.int64)
    k = tl.load(
        k_ptr + page[:, None] * stride_kb + within[:, None] * stride_kt + kv_head * stride_kh + d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    if IEEE:
        s = tl.dot(q, tl.trans(k), input_precision="ieee")
    else:
        s = tl.dot(q, tl.trans(k))
    s = s * qk_scale
    if CHECK_END:
        s = tl.where(ok[None, :], s, float("-inf"))
    if CAUSAL:
        s = tl.where(tok[None, :] <= q_pos[:, None], s, float("-inf"))
    m_new = tl.maximum(m_i, tl.max(s, 1))
    # A row that has seen no key yet has m_new = -inf; keep it finite so exp2 gives 0, not NaN.
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    p = tl.exp2(s - m_safe[:, None])
    alpha = tl.exp2(m_i - m_safe)
    l_i = l_i * alpha + tl.sum(p, 1)
    v = tl.load(
        v_ptr + page[:, None] * stride_vb + within[:, None] * stride_vt + kv_head * stride_vh + d[None, :],
        mask=kv_mask,
        other=0.0,
    )
    if IEEE:
        pv = tl.dot(p.to(v.dtype), v, input_precision="ieee")
    else:
        pv = tl.dot(p.to(v.dtype), v)
    acc = acc * alpha[:, None] + pv
    return acc, m_new, l_i


@triton.jit
def _write_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slots_ptr, stride_k, stride_v, stride_slot, ROW: tl.constexpr,
    BLOCK: tl.constexpr,
):  # fmt: skip
    t = tl.program_id(0)
    slot = tl.load(slots_ptr + t).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < ROW
    k = tl.load(k_ptr + t.to(tl.int64) * stride_k + cols, mask=mask)
    v = tl.load(v_ptr + t.to(tl.int64) * stride_v + cols, mask=mask)
    tl.store(k_cache_ptr + slot * stride_slot + cols, k, mask=mask)
    tl.store(v_cache_ptr + slot * stride_slot + cols, v, mask=mask)


def write_kv(k, v, kv_cache, slot_mapping) -> None:
    """Both of `write_kv` (epd.attention.backend)'s index copies in one launch.

    k, v [tokens, kv_heads, dim], each token's kv_heads * dim values contiguous (any token
    stride); kv_cache [2, blocks, block_size, kv_heads, dim] contiguous; slot_mapping [tokens].
    """
    tokens, kv_heads, dim = k.shape
    row = kv_heads * dim
    for t in (k, v):
        if t.stride(2) != 1 or t.stride(1) != dim:
            raise ValueError("write_kv needs each token's K/V row contiguous")
    if slot_mapping.stride(0) != 1:
        slot_mapping = slot_mapping.contiguous()
    _write_kv_kernel[(tokens,)](
        k, v, kv_cache[0], kv_cache[1], slot_mapping, k.stride(0), v.stride(0), row,
        ROW=row, BLOCK=triton.next_power_of_2(row), num_warps=4,
    )  # fmt: skip
