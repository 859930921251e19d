"""A worker of a tensor-parallel instance (ranks 1..n-1): it only executes what rank 0 sends.

It holds its share of the language model and of the KV cache (its kv heads), no scheduler, no
requests, no sampler, no vision tower; a connector only in an instance that hands KV off, to send
its own heads to D (`SendKV`, `SendLayer`; what became of them goes back to rank 0 when it asks,
`PollSends`). `build_worker` waits for rank 0's
`BuildRank` (the engine config rank 0 builds with), builds exactly what rank 0's
`epd.parallel.parts.rank_model_parts` builds for the same config on this rank's device (CUDA
graphs of the same sizes included, captured alongside rank 0's; its share of the LM head runs
for the logits' all-gather, and what it gathered is dropped),
and `RankWorker.serve` then runs each command as it comes (epd.parallel.commands) until `Stop`.
A decode step that rank 0 replays as a graph, the worker replays too, at the same padded size:
the runner decides from the step alone (`ModelRunner.forward`).
Rank 0 is its only source of work: when rank 0 is gone the worker has nothing left to do and ends
(its lifeline, epd.parallel.lifeline).
"""

from __future__ import annotations

import logging
import time
from dataclasses import replace

import torch

from epd.clock import WALL_CLOCK
from epd.engine.model_runner import ModelRunner
from epd.parallel.commands import (
    BuildRank,
    BuildVision,
    GatherKV,
    GatherLayer,
    InjectKV,
    LayerDone,
    PollSends,
    RunStep,
    SendKV,
    SendLayer,
    Stop,
    slots_tensor,
)
from epd.parallel.encoder import VisionRankWorker, build_vision_worker
from epd.parallel.group import TensorParallelGroup
from epd.parallel.kv import gather_kv_heads, scatter_kv_heads
from epd.parallel.parts import rank_model_parts
from epd.parallel.sharding import HeadSplit
from epd.transfer.base import Connector, SendResult

# How long a stopping worker waits for its last sends to finish (then they are abandoned).
DRAIN_TIMEOUT_S = 30.0

logger = logging.getLogger(__name__)


class RankWorker:
    def __init__(
        self,
        runner: ModelRunner,
        group: TensorParallelGroup,
        heads: HeadSplit,
        connector: Connector | None = None,
    ) -> None:
        self.runner, self.group, self.heads = runner, group, heads
        self.device = runner.device
        self.connector = connector  # sends this rank's heads of hand-offs (a prefill instance's)
        self.commands_run = 0
        self.sends_pending = 0
        self.finished: list[SendResult] = []  # what the connector finished, until rank 0 asks

    def serve(self) -> None:
        """Run rank 0's commands until it says `Stop`."""
        try:
            while True:
                command = self.group.receive_command()
                if isinstance(command, Stop):
                    return
                self.run(command)
                self.commands_run += 1
                self._collect_sends()  # also drives the connector's retries
        finally:
            self._close_connector()

    def run(self, command: object) -> None:
        if isinstance(command, RunStep):
            self._step(command)
        elif isinstance(command, GatherKV):
            local = self.runner.gather_kv(command.block_table, command.num_tokens)
            gather_kv_heads(self.group, local, self.heads)
        elif isinstance(command, InjectKV):
            self._inject(command)
        elif isinstance(command, SendKV):
            if self.group.rank in command.sends:
                self._send_piece(command, self.runner.gather_kv(command.block_table, command.num_tokens))
        elif isinstance(command, PollSends):
            self._collect_sends()
            self.group.gather_objects(self.finished)
            self.finished = []
        else:
            raise RuntimeError(f"tensor-parallel worker {self.group.rank}: unexpected {command!r}")

    def _send_piece(self, command: SendKV | SendLayer, kv: torch.Tensor) -> None:
        if self.connector is None:
            raise RuntimeError(f"tensor-parallel worker {self.group.rank} has no connector to send KV")
        key, meta = command.sends[self.group.rank]
        self.connector.send(command.dest, key, {"kv": kv}, meta)
        self.sends_pending += 1

    def _collect_sends(self) -> None:
        if self.connector is None:
            return
        # A cuda_ipc producer's staging regions come back with its consumers' acks, which arrive
        # on this connector's inbox: unread, they filled the 1 GiB staging buffer after four 9k-token
        # hand-offs and every later send failed "staging buffer full". A worker receives nothing else.
        for received in self.connector.poll_received():
            logger.warning(
                "tensor-parallel worker %d got %r: workers only send", self.group.rank, received.key
            )
        if self.sends_pending:
            done = self.connector.poll_sent()
            self.sends_pending -= len(done)
            self.finished += done

    def _close_connector(self) -> None:
        """Let the sends under way finish (a bounded wait), then free the connector."""
        if self.connector is None:
            return
        deadline = time.monotonic() + DRAIN_TIMEOUT_S
        while self.sends_pending and time.monotonic() < deadline:
            self._collect_sends()
            time.sleep(0.001)
        self.connector.close()

    def _step(self, command: RunStep) -> None:
        step = command.step
        if command.mm_shape is not None:
            rows = torch.empty(command.mm_shape, dtype=command.mm_dtype, device=self.device)
            step = replace(step, mm_embeds=self.group.broadcast(rows))
        token_ids = None
        if command.ids_follow:  # async scheduling: ids sampled on rank 0, never read by its host
            ids = torch.empty(len(step.token_ids), dtype=torch.long, device=self.device)
            token_ids = self.group.broadcast(ids)
        hook = self._follow_layer if command.streams_layers else None
        self.runner.forward(step, hook, logits=False, token_ids=token_ids)

    def _follow_layer(self, layer: int) -> None:
        """After a layer of a streaming step: the gathers rank 0's hook asks for, until `LayerDone`."""
        while not isinstance(command := self.group.receive_command(), LayerDone):
            if isinstance(command, SendLayer):
                if self.group.rank in command.sends:
                    slots = slots_tensor(command.slots, self.device)
                    self._send_piece(command, self.runner.gather_kv_layer(command.layer, slots))
                continue
            if not isinstance(command, GatherLayer):
                raise RuntimeError(f"tensor-parallel worker {self.group.rank}: {command!r} inside a forward")
            local = self.runner.gather_kv_layer(command.layer, slots_tensor(command.slots, self.device))
            gather_kv_heads(self.group, local, self.heads)

    def _inject(self, command: InjectKV) -> None:
        cache = self.runner.kv_cache  # [layers, 2, blocks, block_size, kv heads, head_dim]
        shape = (cache.shape[0], 2, command.num_tokens, *cache.shape[-2:])
        mine = torch.empty(shape, dtype=cache.dtype, device=self.device)
        scatter_kv_heads(self.group, None, self.heads, mine)
        self.runner.write_kv_rows(command.block_table, command.start, mine)


def build_worker(
    group: TensorParallelGroup, device: str, connector: Connector | None = None
) -> RankWorker | VisionRankWorker:
    """This rank's share, built when rank 0 says how, on `device`: of the language model
    (`BuildRank`), or of the split vision tower of an encoder-only instance (`BuildVision`,
    epd.parallel.encoder). `connector`: where its heads of hand-offs leave (a prefill instance's
    workers; None elsewhere)."""
    command = group.receive_command()
    if isinstance(command, BuildVision):
        return build_vision_worker(group, device, command)
    if not isinstance(command, BuildRank):
        raise RuntimeError(f"tensor-parallel worker {group.rank}: expected BuildRank first, got {command!r}")
    config = replace(command.config, device=device)
    parts = rank_model_parts(group, logits=False)(
        config, encode_locally=False, mm_cache=None, clock=WALL_CLOCK, instance=command.instance
    )
    text = config.model.hf.text
    heads = HeadSplit(text.num_attention_heads, text.num_key_value_heads, group.world_size)
    return RankWorker(parts.runner, group, heads, connector)
