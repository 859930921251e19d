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

import numpy as np
import torch


@dataclass(frozen=True)
class AttentionMetadata:
    """Layout of one step's flattened batch.

    Sequence i contributes `query_lens[i]` new tokens, laid out contiguously from
    `query_starts[i]` in the flat batch; after this step its context holds `seq_lens[i]`
    tokens (cached ones first), stored in the blocks `block_tables[i]`.
    `slot_mapping[j]` is where token j's K/V goes: block_id * block_size + offset.

    The optional `tensors` hold the same layout on the device, for kernels that read it
    there (and for CUDA graphs, whose replays cannot read Python lists). When present they
    are authoritative for such kernels; a graph replay may pad them past `num_seqs`.
    """

    slot_mapping: torch.Tensor
    query_starts: list[int]
    query_lens: list[int]
    seq_lens: list[int]
    block_tables: list[list[int]]
    block_size: int
    tensors: DeviceMetadata | None = None

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)


@dataclass(frozen=True)
class DeviceMetadata:
    """The batch layout as int32 device tensors, for kernels.

    `query_starts` [seqs + 1] (cumulative, the last entry the total), `seq_lens` [seqs],
    `block_tables` [seqs, width] (rows padded with any valid block id past each sequence's
    blocks; width >= every sequence's block count). `max_query_len` and `max_seq_len` are
    upper bounds (exact in eager steps; a captured graph uses the longest it supports).
    `decode_only`: every sequence has exactly one new token, the batch's row i is
    sequence i's (what a CUDA-graph decode step guarantees).
    """

    query_starts: torch.Tensor
    seq_lens: torch.Tensor
    block_tables: torch.Tensor
    max_query_len: int
    max_seq_len: int

    @property
    def decode_only(self) -> bool:
        return self.max_query_len == 1


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


def build_device_metadata(
    query_lens: list[int],
    seq_lens: list[int],
    block_tables: list[list[int]],
    device: torch.device,
    width: int | None = None,
) -> DeviceMetadata:
    """The tensors of a batch layout, packed on the host and sent in one copy.

    `width` (default: the longest table) sets the block-table row length.
    """
    num_seqs = len(query_lens)
    width = max(1, max((len(t) for t in block_tables), default=1)) if width is None else width
    packed = np.zeros(2 * num_seqs + 1 + num_seqs * width, dtype=np.int32)
    np.cumsum(query_lens, out=packed[1 : num_seqs + 1])
    packed[num_seqs + 1 : 2 * num_seqs + 1] = seq_lens
    tables = packed[2 * num_seqs + 1 :].reshape(num_seqs, width)
    for row, table in zip(tables, block_tables):
        row[: len(table)] = table
    on_device = torch.from_numpy(packed).to(device)
    return DeviceMetadata(
        query_starts=on_device[: num_seqs + 1],
        seq_lens=on_device[num_seqs + 1 : 2 * num_seqs + 1],
        block_tables=on_device[2 * num_seqs + 1 :].view(num_seqs, width),
        max_query_len=max(query_lens, default=0),
        max_seq_len=max(seq_lens, default=0),
    )
