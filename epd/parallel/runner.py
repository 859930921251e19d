"""Rank 0's runner in a tensor-parallel instance: `ModelRunner`'s interface over every rank.

The engine on rank 0 (its scheduler, block manager, sampler, connectors) calls this as it calls a
`ModelRunner` and never learns of the workers: each call sends its command (epd.parallel.commands)
and runs rank 0's share through the `ModelRunner` of rank 0's model. Only rank 0 computes logits.
KV crosses this interface whole (every kv head), as at degree 1: `gather_kv` gathers the heads of
every rank to rank 0, `inject_kv` scatters them; so swaps, migrations and hand-offs arriving need
nothing new, and a P of one degree hands off to a D of another (epd.parallel.kv). A prefill
instance's hand-offs (`handoff_kv`, `handoff_kv_layer`) leave each rank's heads where they are when
its workers hold a connector (`sends_by_rank`): each sending rank sends its own piece to D
(`HeadShares`), and `poll_worker_sends` brings back what became of the workers' sends.

A step goes to the workers as the prepared `StepInputs` (flat ids, slots, positions, block tables),
not as a diff of requests: the workers then need no request state at all. Its image rows are
broadcast as a tensor; workers hold no vision tower and no MM cache.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import replace

import torch

from epd.engine.cuda_graphs import DecodeGraphs
from epd.engine.embedders import ImageEmbedder
from epd.engine.model_runner import ModelRunner, StepInputs
from epd.engine.scheduler import ScheduledBatch
from epd.parallel.commands import (
    Command,
    GatherKV,
    GatherLayer,
    InjectKV,
    LayerDone,
    PollSends,
    RunStep,
    SendKV,
    SendLayer,
    Stop,
)
from epd.parallel.group import TensorParallelGroup
from epd.parallel.kv import HEAD_DIM, HeadShares, RankSends, gather_kv_heads, head_ranges, scatter_kv_heads
from epd.parallel.sharding import HeadSplit
from epd.transfer.base import SendResult


class ParallelRunner:
    def __init__(
        self, local: ModelRunner, group: TensorParallelGroup, heads: HeadSplit, sends_by_rank: bool = False
    ) -> None:
        """`local`: the runner of rank 0's share; `heads`: how the kv heads are split;
        `sends_by_rank`: the workers hold connectors, so hand-offs leave each rank's heads to it."""
        if group.rank != 0:
            raise ValueError("the instance's runner is rank 0's; workers run epd.parallel.worker")
        self.local, self.group, self.heads = local, group, heads
        self.sends_by_rank = sends_by_rank
        self.worker_sends_pending = 0  # pieces the workers were told to send, not yet reported

    # ---- what the engine reads of a runner ----------------------------------------------------

    @property
    def merge_size(self) -> int:
        return self.local.merge_size

    @property
    def embedder(self) -> ImageEmbedder:
        return self.local.embedder

    @embedder.setter
    def embedder(self, embedder: ImageEmbedder) -> None:  # a role switch rewires it
        self.local.embedder = embedder

    @property
    def kv_cache(self) -> torch.Tensor:
        """Rank 0's share of the cache: its kv heads."""
        return self.local.kv_cache

    @property
    def block_size(self) -> int:
        return self.local.block_size

    @property
    def graphs(self) -> DecodeGraphs | None:
        """Rank 0's decode graphs (each worker holds the same sizes); None: eager steps only."""
        return self.local.graphs

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        return self.local.slots(block_table, start, end)

    # ---- calls every rank runs ----------------------------------------------------------------

    def run(
        self,
        batch: ScheduledBatch,
        block_tables: list[list[int]],
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        return self.forward(self.prepare(batch, block_tables), after_layer)

    def prepare(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> StepInputs:
        """The step as plain data, on rank 0 (images encoded or read from the MM cache here)."""
        return self.local.prepare(batch, block_tables)

    def forward(
        self,
        step: StepInputs,
        after_layer: Callable[[int], None] | None = None,
        logits: bool = True,
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """`ModelRunner.forward` on every rank. `token_ids` (async scheduling: the ids the step
        before sampled, still on the device) reach the workers by a broadcast that no host waits
        for, as the image rows do."""
        if not logits:
            raise ValueError("rank 0 of a tensor-parallel instance computes the logits")
        rows = step.mm_embeds
        shape, dtype = (None, None) if rows is None else (tuple(rows.shape), rows.dtype)
        ids_follow = token_ids is not None
        self._send(RunStep(replace(step, mm_embeds=None), shape, dtype, after_layer is not None, ids_follow))
        if rows is not None:
            self.group.broadcast(rows.contiguous())
        if token_ids is not None:
            token_ids = self.group.broadcast(token_ids.to(torch.long).contiguous())
        hook = None if after_layer is None else self._then_release_layer(after_layer)
        return self.local.forward(step, hook, token_ids=token_ids)

    def gather_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """[layers, 2, num_tokens, all kv heads, head_dim]: what `ModelRunner.gather_kv` gives at degree 1."""
        self._send(GatherKV(block_table, num_tokens))
        return gather_kv_heads(self.group, self.local.gather_kv(block_table, num_tokens), self.heads)

    def gather_kv_layer(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """One layer's KV of every kv head; called inside a streaming step (`run`'s `after_layer`)."""
        self._send(GatherLayer(layer, slots.tolist()))
        return gather_kv_heads(self.group, self.local.gather_kv_layer(layer, slots), self.heads)

    def inject_kv(self, block_table: list[int], start: int, kv: torch.Tensor) -> None:
        """KV of every kv head (`ModelRunner.inject_kv`'s): each rank keeps its heads' rows."""
        rows = kv[:, :, start:].to(self.local.device, self.local.kv_cache.dtype)
        self._send(InjectKV(block_table, start, rows.shape[2]))
        shape = list(rows.shape)
        shape[HEAD_DIM] = self.local.kv_cache.shape[HEAD_DIM]
        mine = torch.empty(shape, dtype=rows.dtype, device=rows.device)
        self.local.write_kv_rows(block_table, start, scatter_kv_heads(self.group, rows, self.heads, mine))

    def handoff_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor | HeadShares:
        """A hand-off's KV: whole (`gather_kv`), or left on the ranks when they send it themselves."""
        if not self.sends_by_rank:
            return self.gather_kv(block_table, num_tokens)
        mine = self.local.gather_kv(block_table, num_tokens)
        return self._shares(
            mine, lambda dest, sends: self._send_rest(SendKV(block_table, num_tokens, dest, sends))
        )

    def handoff_kv_layer(self, layer: int, slots: torch.Tensor) -> torch.Tensor | HeadShares:
        """One layer of a streamed hand-off (inside `run`'s `after_layer`), as `handoff_kv`."""
        if not self.sends_by_rank:
            return self.gather_kv_layer(layer, slots)
        mine, where = self.local.gather_kv_layer(layer, slots), slots.tolist()
        return self._shares(mine, lambda dest, sends: self._send_rest(SendLayer(layer, where, dest, sends)))

    def poll_worker_sends(self) -> list[SendResult]:
        """What the workers' connectors finished since the last call (each send once, failures
        included); asks them (one gather over the side group) only while sends are outstanding."""
        if not self.worker_sends_pending:
            return []
        self._send(PollSends())
        replies = self.group.gather_objects([])
        results = [result for reply in replies[1:] for result in reply]
        self.worker_sends_pending -= len(results)
        return results

    def stop_workers(self) -> None:
        """Let the workers return from their loop (they also exit when this process ends)."""
        self._send(Stop())

    # ---- internals ----------------------------------------------------------------------------

    def _send(self, command: Command) -> None:
        self.group.send_command(command)

    def _shares(self, mine: torch.Tensor, send_rest: Callable[[str, RankSends], None]) -> HeadShares:
        return HeadShares(mine, head_ranges(self.heads), self.heads.kv_holders(), send_rest)

    def _send_rest(self, command: SendKV | SendLayer) -> None:
        self._send(command)
        self.worker_sends_pending += len(command.sends)

    def _then_release_layer(self, after_layer: Callable[[int], None]) -> Callable[[int], None]:
        """The engine's hook, then `LayerDone`: the workers wait after each layer for the gathers
        the hook asks for, and go on to the next layer when told."""

        def hook(layer: int) -> None:
            after_layer(layer)
            self._send(LayerDone())

        return hook
