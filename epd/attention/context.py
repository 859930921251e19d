"""The per-forward attention metadata, scoped by a context manager.

The model runner builds one `AttentionMetadata` per step and enters `forward_context`
around the model call; attention layers read it with `get_forward_context()`. Scoping
(instead of a bare global) makes a stale or nested batch an error rather than a silent
mix-up.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Layout of one step's flattened batch.

    Sequence i contributes `query_lens[i]` new tokens, laid out contiguously from
    `query_starts[i]` in the flat batch; after this step its context holds `seq_lens[i]`
    tokens (cached ones first), stored in the blocks `block_tables[i]`.
    `slot_mapping[j]` is where token j's K/V goes: block_id * block_size + offset.
    """

    slot_mapping: torch.Tensor
    query_starts: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    block_size: int

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


@dataclass
class ForwardContext:
    metadata: AttentionMetadata


_current: ForwardContext | None = None


@contextmanager
def forward_context(metadata: AttentionMetadata) -> Iterator[ForwardContext]:
    global _current
    if _current is not None:
        raise RuntimeError("forward_context entered twice: one model forward at a time")
    _current = ForwardContext(metadata)
    try:
        yield _current
    finally:
        _current = None


def get_forward_context() -> ForwardContext:
    if _current is None:
        raise RuntimeError("no forward context: attention layers run only inside forward_context(...)")
    return _current
