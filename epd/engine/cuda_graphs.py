"""CUDA graphs of whole decode steps: token ids in, logits out, one graph per padded batch size.

Hot path. A decode step of a 7B model is ~400 small kernel launches; launched from Python
they take longer than the GPU needs to run them at small batch. Replaying a captured graph
launches them all at once.

What a graph may capture: only steps where every sequence has exactly one new token and no
image rows (pure decode). Everything the step reads lives in static device buffers that are
refilled before each replay (three host-to-device copies):

    rows64     int64 [max_batch, 5]       token id | position t | position h | position w | KV slot
    seq_lens   int32 [max_batch]          context length (new token included)
    tables     int32 [max_batch, width]   block table rows

(torch ops take the strided columns of rows64; the attention kernels need unit strides, so
the int32 buffers are separate.) The copies go through pinned memory: a copy from pageable memory
may wait for the work already queued on the stream, which would end the overlap of async scheduling
(epd.engine.async_scheduling), where the next step is launched while the last one still runs. There
the token ids come from the device too (the tokens the last step sampled, `run`'s
`device_token_ids`): copied into rows64's first column after the host's placeholders.

A batch of n sequences replays the graph of the smallest captured size >= n; rows n.. are
padding: token 0 at position 0, context length 1, their single K/V row in the scratch block
(one block past those the block manager owns), so they never touch a real sequence's cache.
Graphs share one memory pool (safe: graphs never run concurrently, and each replay's logits
are read before the next). The runner captures every size at start (`capture_all`), largest
first so the smaller ones reuse its memory; a size missing is captured on its first step.

Tensor parallelism (epd.parallel): each rank captures its share of the forward, the decoder's
all-reduces included (torch.distributed over nccl, in place on tensors of the graph's pool: no
host sync, nothing captured stays outside the pool). NCCL pairs those all-reduces across ranks
at replay, so every rank captures the same sizes in the same order (they build together, driven
by rank 0's `BuildRank`) and replays the graph of the same padded size at each step (the same
`StepInputs`, the same sizes). Only rank 0 samples: a worker's graphs are built without
`logits` and end at the decoder's hidden states (the LM head's matmul is not worth replaying
where nobody reads it), unless the head is split by vocabulary (epd.parallel.linear): then every
rank's graph runs its share and the all-gather.
"""

from __future__ import annotations

import numpy as np
import torch

from epd.attention.context import AttentionMetadata, DeviceMetadata, forward_context

DEFAULT_SIZES = (1, 2, 4, 8, 16, 24, 32, 48, 64, 96, 128, 160, 192, 224, 256)


def graph_sizes(max_num_seqs: int | None) -> tuple[int, ...]:
    """The default sizes up to the first that holds `max_num_seqs` sequences (all if None)."""
    if max_num_seqs is None or max_num_seqs >= DEFAULT_SIZES[-1]:
        return DEFAULT_SIZES
    last = next(i for i, s in enumerate(DEFAULT_SIZES) if s >= max_num_seqs)
    return DEFAULT_SIZES[: last + 1]


class DecodeGraphs:
    def __init__(
        self,
        model: torch.nn.Module,
        block_size: int,
        scratch_block: int,
        table_width: int,
        device: torch.device,
        sizes: tuple[int, ...] = DEFAULT_SIZES,
        logits: bool = True,
    ) -> None:
        """`scratch_block`: a KV block no sequence owns; `table_width`: the longest block
        table a sequence can have (bounds the context the graphs attend over); `logits` False:
        the graphs end at the hidden states (a tensor-parallel worker's, which samples nothing)."""
        self.model, self.block_size, self.scratch_block = model, block_size, scratch_block
        self.logits = logits
        self.sizes = tuple(sorted(sizes))
        self.max_batch, self.width = self.sizes[-1], table_width
        self.rows64 = torch.zeros(self.max_batch, 5, dtype=torch.int64, device=device)
        self.seq_lens = torch.ones(self.max_batch, dtype=torch.int32, device=device)
        self.tables = torch.zeros(self.max_batch, table_width, dtype=torch.int32, device=device)
        self.query_starts = torch.arange(self.max_batch + 1, dtype=torch.int32, device=device)
        self.host_tables = HostTables(self.max_batch, table_width, scratch_block)
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor]] = {}

    def capture_all(self) -> None:
        """Capture every size now: a capture (~0.1 s on a 7B model) inside a running workload
        stalls every request in the batch, and a workload meets many sizes as it drains."""
        for size in reversed(self.sizes):
            if size not in self.graphs:
                self._capture(size)

    def padded_size(self, num_seqs: int) -> int | None:
        """The captured size a batch of `num_seqs` decodes runs at; None if too large."""
        return next((s for s in self.sizes if s >= num_seqs), None)

    def run(
        self,
        token_ids: list[int],
        positions: list[int],
        slots: list[int],
        seq_lens: list[int],
        tables: list[list[int]],
        device_token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [n, vocab] (model dtype) of a pure-decode step of n = len(token_ids) sequences
        (hidden states [n, hidden] when built without `logits`).

        `positions` are the text positions (all three M-RoPE rows equal in decode). The
        returned tensor is a view of the graph's output: read it before the next call.
        `device_token_ids` [n], given: the token ids, on the device (`token_ids` are placeholders).
        """
        n = len(token_ids)
        size = self.padded_size(n)
        graph, out = self.graphs.get(size) or self._capture(size)
        self._fill(token_ids, positions, slots, seq_lens, tables, size)
        if device_token_ids is not None:
            self.rows64[:n, 0].copy_(device_token_ids)
        graph.replay()
        return out[:n]

    def _fill(self, token_ids, positions, slots, seq_lens, tables, size: int) -> None:
        n = len(token_ids)
        width = max(len(t) for t in tables)
        rows64 = np.zeros((size, 5), dtype=np.int64)
        rows64[:n, 0] = token_ids
        rows64[:n, 1:4] = np.asarray(positions, dtype=np.int64)[:, None]
        rows64[:n, 4] = slots
        rows64[n:, 4] = self.scratch_block * self.block_size
        lens = np.ones(size, dtype=np.int32)
        lens[:n] = seq_lens
        rows = self.host_tables.fill(tables, size)[:size, :width]
        _upload(self.rows64[:size], rows64)
        _upload(self.seq_lens[:size], lens)
        _upload(self.tables[:size, :width], rows)

    def _capture(self, size: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        self._fill([0] * size, [0] * size, [self.scratch_block * self.block_size] * size, [1] * size,
                   [[self.scratch_block]] * size, size)  # fmt: skip
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            self._step(size)  # warm-up: compiles kernels, creates library handles outside capture
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self.pool):
            out = self._step(size)
        self.graphs[size] = (graph, out)
        return graph, out

    def _step(self, size: int) -> torch.Tensor:
        """The captured work: embedding, the decoder layers, the LM head (with `logits`), on
        static buffers."""
        rows64 = self.rows64[:size]
        tensors = DeviceMetadata(
            query_starts=self.query_starts[: size + 1],
            seq_lens=self.seq_lens[:size],
            block_tables=self.tables[:size],
            max_query_len=1,
            max_seq_len=self.width * self.block_size,
        )
        meta = AttentionMetadata(
            slot_mapping=rows64[:, 4],
            query_starts=list(range(size)),
            query_lens=[1] * size,
            seq_lens=[1] * size,  # not read on this path: the kernels take `tensors`
            block_tables=[[self.scratch_block]] * size,
            block_size=self.block_size,
            tensors=tensors,
        )
        with forward_context(meta):
            embeds = self.model.embed_tokens(rows64[:, 0])
            hidden = self.model(embeds, rows64[:, 1:4].t())
            return self.model.compute_logits(hidden) if self.logits else hidden


def _upload(buffer: torch.Tensor, array: np.ndarray) -> None:
    """Copy `array` into the device `buffer` without blocking, through a pinned copy of it (the
    caching host allocator keeps that block until the copy has run; `array` may change at once)."""
    buffer.copy_(torch.from_numpy(np.ascontiguousarray(array)).pin_memory(), non_blocking=True)


class HostTables:
    """The host side of the graphs' block-table buffer, kept from step to step.

    A decoding sequence's table changes only when it takes a new block (every block_size
    steps) or when the rows shift (a request before it finished), so each row is compared
    with what it held at the last step and written only from where it differs: converting
    every table to numpy at every step was the largest host cost of a batch-64 graph step.
    Entries past a row's own table may be stale; the kernels never read them (they read the
    blocks below each row's context length only; padding rows read their first entry).
    """

    def __init__(self, max_batch: int, width: int, scratch_block: int) -> None:
        self.array = np.full((max_batch, width), scratch_block, dtype=np.int32)
        self.scratch = [scratch_block]
        self.held: list[list[int]] = [self.scratch] * max_batch  # what each row holds now

    def fill(self, tables: list[list[int]], size: int) -> np.ndarray:
        """Rows 0..len(tables)-1 take `tables`, the rest up to `size` the scratch block."""
        array, held = self.array, self.held
        for i, table in enumerate(tables):
            old = held[i]
            if table != old:
                grown = len(table) > len(old) and table[: len(old)] == old
                start = len(old) if grown else 0
                array[i, start : len(table)] = table[start:]
                held[i] = list(table)  # a copy: the caller may reuse its list
        for i in range(len(tables), size):
            if held[i] is not self.scratch:
                array[i, 0] = self.scratch[0]
                held[i] = self.scratch
        return array
