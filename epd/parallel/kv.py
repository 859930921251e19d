"""A request's KV between the whole (every kv head: what hand-offs, swaps and migrations carry) and
the ranks' shares (each rank's cache holds its kv heads only).

    gather_kv_heads    each rank's [..., its kv heads, head_dim] -> rank 0: [..., all kv heads, head_dim]
    scatter_kv_heads   rank 0's [..., all kv heads, head_dim] -> each rank: its kv heads

The kv head dim is the second last in every KV shape that moves ([layers, 2, tokens, heads, d]
for a request, [2, tokens, heads, d] for one layer). Ranks that share a kv head (more ranks than
kv heads) hold the same values: a gather takes each head from its first holder
(`HeadSplit.kv_holders`), a scatter gives every holder a copy.

The whole KV passes through rank 0 both ways (simple, and the hand-off code stays the one it is at
degree 1). The faster way sends each piece straight between the ranks that hold it on each side
(a P rank's heads to the D rank that keeps them, over cuda_ipc), with no gather and no scatter:
see "KV between a tp2 P and a tp1 D" in epd.parallel.
"""

from __future__ import annotations

import torch

from epd.parallel.group import TensorParallelGroup
from epd.parallel.sharding import HeadSplit

HEAD_DIM = -2  # the kv head dim of every KV shape here


def gather_kv_heads(group: TensorParallelGroup, local: torch.Tensor, heads: HeadSplit) -> torch.Tensor | None:
    """Every rank calls it with its share; rank 0 gets the KV of all kv heads, the others None."""
    parts = group.gather(local)
    if parts is None:
        return None
    return torch.cat([parts[rank] for rank in heads.kv_holders()], dim=HEAD_DIM)


def scatter_kv_heads(
    group: TensorParallelGroup,
    whole: torch.Tensor | None,
    heads: HeadSplit,
    out: torch.Tensor,
) -> torch.Tensor:
    """Rank 0 passes the KV of all kv heads (`whole`, on `out`'s device and dtype), the others None;
    every rank gets its kv heads in `out` (shaped like `whole` with this rank's head count)."""
    parts = None
    if whole is not None:
        pieces = whole.chunk(heads.kv_pieces, dim=HEAD_DIM)
        parts = [pieces[heads.kv_piece(rank)] for rank in range(group.world_size)]
    return group.scatter(out, parts)
