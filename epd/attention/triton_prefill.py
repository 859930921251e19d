"""Causal attention for a packed batch of variable-length sequences over the paged KV cache.

Hot path, GPU only (imported by the Triton backend, never on a CPU-only install).

Each sequence's new tokens (its queries) sit at the end of its context; the context's K/V,
the cached prefix and the new tokens alike, is read from the paged cache, so a prefix-cache
hit needs nothing special. The new tokens' K/V must be written to the cache first.

Grid: (query tile, query head). The host lists the tiles (`tile_seqs`, `tile_starts`: each
tile is BLOCK_M consecutive new tokens of one sequence), so one launch serves the whole
batch whatever the lengths. A tile at positions p..p+BLOCK_M-1 reads keys 0..p+BLOCK_M-1:
first the keys every row sees (no mask), then the diagonal chunks with the causal mask.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from epd.attention.triton_common import attend_chunk

LOG2E = 1.4426950408889634


@triton.jit
def _prefill_kernel(
    q_ptr,
    k_ptr,
    v_ptr,
    tables_ptr,
    query_starts_ptr,
    seq_lens_ptr,
    tile_seqs_ptr,
    tile_starts_ptr,
    out_ptr,
    qk_scale,
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
    HEAD_DIM: tl.constexpr,
    DIM_PAD: tl.constexpr,
    PAGE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    IEEE: tl.constexpr,
):
    tile = tl.program_id(0)
    head = tl.program_id(1)
    kv_head = head // GROUP
    seq = tl.load(tile_seqs_ptr + tile)
    m0 = tl.load(tile_starts_ptr + tile)
    q_begin = tl.load(query_starts_ptr + seq)
    q_len = tl.load(query_starts_ptr + seq + 1) - q_begin
    seq_len = tl.load(seq_lens_ptr + seq)
    first_pos = seq_len - q_len + m0  # position of the tile's first query

    rows = m0 + tl.arange(0, BLOCK_M)
    row_ok = rows < q_len
    d = tl.arange(0, DIM_PAD)
    d_ok = d < HEAD_DIM
    q_rows = (q_begin + rows).to(tl.int64)
    q = tl.load(
        q_ptr + q_rows[:, None] * stride_qt + head * stride_qh + d[None, :],
        mask=row_ok[:, None] & d_ok[None, :],
        other=0.0,
    )
    q_pos = first_pos + tl.arange(0, BLOCK_M)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, DIM_PAD], tl.float32)
    table_row = tables_ptr + seq * stride_table
    end = tl.minimum(first_pos + BLOCK_M, seq_len)
    full_end = (first_pos + 1) // BLOCK_N * BLOCK_N  # keys below it: seen by every row, all valid
    for n0 in range(0, full_end, BLOCK_N):
        acc, m_i, l_i = attend_chunk(
            q, acc, m_i, l_i, n0, end, q_pos, k_ptr, v_ptr, table_row, kv_head,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, qk_scale, d, d_ok,
            PAGE=PAGE, BLOCK_N=BLOCK_N, CHECK_END=False, CAUSAL=False, IEEE=IEEE,
        )  # fmt: skip
    for n0 in range(full_end, end, BLOCK_N):
        acc, m_i, l_i = attend_chunk(
            q, acc, m_i, l_i, n0, end, q_pos, k_ptr, v_ptr, table_row, kv_head,
            stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh, qk_scale, d, d_ok,
            PAGE=PAGE, BLOCK_N=BLOCK_N, CHECK_END=True, CAUSAL=True, IEEE=IEEE,
        )  # fmt: skip
    result = acc / tl.where(l_i > 0.0, l_i, 1.0)[:, None]
    out = out_ptr + q_rows[:, None] * stride_ot + head * stride_oh + d[None, :]
    tl.store(out, result.to(out_ptr.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])


def tile_map(query_lens: list[int], block_m: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(sequence, first new token) of every BLOCK_M-token query tile, longest sequences first
    (their tiles are the slowest, so they should start first)."""
    order = sorted(range(len(query_lens)), key=lambda i: -query_lens[i])
    # Within a sequence the last tiles see the most keys: they go first too.
    pairs = [(i, m0) for i in order for m0 in reversed(range(0, query_lens[i], block_m))]
    packed = torch.tensor(pairs, dtype=torch.int32).t().contiguous()
    return packed.to(device, non_blocking=True).unbind(0)


def paged_prefill_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    query_starts: torch.Tensor,
    seq_lens: torch.Tensor,
    query_lens: list[int],
    scale: float,
    out: torch.Tensor | None = None,
) -> torch.Tensor:
    """Causal attention of every sequence's new tokens over its whole paged context.

    q [tokens, heads, dim], sequence i's new tokens at rows query_starts[i] .. query_starts[i+1]-1;
    k_cache, v_cache [blocks, block_size, kv_heads, dim] holding every context token's K/V
    (new ones included); block_tables [seqs, width] int32; seq_lens [seqs] int32 (context
    lengths, new tokens included); `query_lens` the same new-token counts as a host list
    (it sizes the grid). Returns [tokens, heads, dim] in q's dtype.
    """
    tokens, heads, dim = q.shape
    kv_heads, page = k_cache.shape[2], k_cache.shape[1]
    inner = (q.stride(2), k_cache.stride(3), v_cache.stride(3), block_tables.stride(1))
    if inner != (1, 1, 1, 1) or query_starts.stride(0) != 1 or seq_lens.stride(0) != 1:
        raise ValueError("paged_prefill_attention needs unit inner strides")
    dim_pad = triton.next_power_of_2(dim)
    out = torch.empty_like(q) if out is None else out
    ieee = q.dtype == torch.float32
    block_m, block_n = (64, 32) if ieee or dim_pad > 128 else (128, 64)
    tile_seqs, tile_starts = tile_map(query_lens, block_m, q.device)
    _prefill_kernel[(tile_seqs.numel(), heads)](
        q,
        k_cache,
        v_cache,
        block_tables,
        query_starts,
        seq_lens,
        tile_seqs,
        tile_starts,
        out,
        scale * LOG2E,
        q.stride(0),
        q.stride(1),
        *k_cache.stride()[:3],
        *v_cache.stride()[:3],
        block_tables.stride(0),
        out.stride(0),
        out.stride(1),
        GROUP=heads // kv_heads,
        HEAD_DIM=dim,
        DIM_PAD=dim_pad,
        PAGE=page,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        IEEE=ieee,
        num_warps=8 if block_m == 128 else 4,
        num_stages=3 if block_m == 128 else 2,
    )
    return out
