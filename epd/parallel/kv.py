"""A request's KV between the whole (every kv head: what hand-offs, swaps and migrations carry) and
the ranks' shares (each rank's cache holds its kv heads only).

    gather_kv_heads    each rank's [..., its kv heads, head_dim] -> rank 0: [..., all kv heads, head_dim]
    scatter_kv_heads   rank 0's [..., all kv heads, head_dim] -> each rank: its kv heads

The kv head dim is the second last in every KV shape that moves ([layers, 2, tokens, heads, d]
for a request, [2, tokens, heads, d] for one layer). Ranks that share a kv head (more ranks than
kv heads) hold the same values: a gather takes each head from its first holder
(`HeadSplit.kv_holders`), a scatter gives every holder a copy.

    HeadShares         a hand-off's KV left where it is: rank 0's heads here, each worker told to
                       send its own heads straight to D (no gather through rank 0)

Swaps, migrations and hand-offs arriving pass the whole KV through rank 0 (simple, and that code
stays the one it is at degree 1). A prefill instance's hand-offs do not: each rank that first
holds a kv piece sends it to D itself (`HeadShares`), and D assembles the pieces (see "KV between
a tp2 P and a tp1 D" in epd.parallel).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

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


# A worker's sends for one hand-off: its rank -> (the transfer key, the meta) of its piece.
RankSends = dict[int, tuple[str, dict]]


@dataclass
class HeadShares:
    """A hand-off's KV (a request's, or one layer of it) still on the ranks that hold it.

    `mine` is rank 0's piece, gathered here; the other pieces stay in the workers' caches until
    `send_rest(dest, sends)` commands each sending rank to send its piece to `dest` under the key
    and meta `sends` gives it (epd.cluster.kv_handoff composes those). Pieces are in head order:
    piece i holds kv heads `head_ranges[i]` and is sent by rank `senders[i]` (rank 0 first).
    """

    mine: torch.Tensor
    head_ranges: list[tuple[int, int]]
    senders: list[int]
    send_rest: Callable[[str, RankSends], None]


def head_ranges(heads: HeadSplit) -> list[tuple[int, int]]:
    """The [start, end) kv heads of each piece, in head order (piece i is held first by rank
    `heads.kv_holders()[i]`)."""
    width = heads.num_kv_heads
    return [(piece * width, (piece + 1) * width) for piece in range(heads.kv_pieces)]
