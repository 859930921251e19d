"""The simulator's model runner: a forward takes the time the cost model gives it, and does nothing else.

It has the interface of the scripted runner (epd.engine.scripted_runner) and, like it, loads no
weights; unlike it, it keeps no number per KV slot and derives no token from them, which was most
of an engine step's time there (and, with a real model's vocabulary, a [batch, 152k] logits block
per step). Everything around it runs as in the engine: the scheduler, the block manager and its
prefix cache, the sampler, the embedder that encodes or fetches each image's embeddings (the
scripted vision tower, spending the cost model's time), and the KV hand-offs, which carry one row
per token (the memory network charges the real bytes: epd.sim.wire).

Every next token is the same ordinary token (the lowest id that is not an end of sequence), so a
request runs to its max_tokens or a stop rule: what `epd bench`'s synthetic requests (ignore_eos)
do on a real server. A workload that stops at EOS on a real model generates longer answers here.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial

import torch

from epd.clock import Clock
from epd.cluster.instance.core import Compute
from epd.config import EngineConfig
from epd.engine.embedders import ImageEmbedder
from epd.engine.factory import ModelParts, choose_embedder
from epd.engine.mm_cache import MMCache
from epd.engine.scheduler import ScheduledBatch
from epd.engine.scripted_runner import ComputeCosts, VirtualCost, scripted_vision, virtual_cost
from epd.sampling_params import MAX_LOGPROBS


class CostModelRunner:
    def __init__(self, merge_size: int, token: int, embedder: ImageEmbedder, cost: VirtualCost) -> None:
        self.merge_size, self.token, self.embedder, self.cost = merge_size, token, embedder, cost
        # Rows of logits that pick `token`: narrow (the sampler reads no more), yet wide enough for
        # the most logprobs a request may ask for.
        self.width = max(token, MAX_LOGPROBS) + 1
        self._logits: dict[int, torch.Tensor] = {}  # by batch size; nothing writes into them

    def run(
        self,
        batch: ScheduledBatch,
        block_tables: list[list[int]],
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """[len(batch), width] logits whose argmax (and, at any temperature, sample) is `token`."""
        ends = batch.token_ends()
        self.embedder.ensure(batch.requests, ends)
        self.cost.clock.advance(self.cost.costs.step_seconds(batch))
        if after_layer is not None:
            after_layer(0)  # one "layer", as the scripted runner has
        return self._rows(len(batch))

    def _rows(self, count: int) -> torch.Tensor:
        rows = self._logits.get(count)
        if rows is None:
            rows = self._logits[count] = torch.zeros(count, self.width)
            rows[:, self.token] = 1e4
        return rows

    # ---- KV: one row per token, [layers=1, 2, tokens, kv_heads=1, head_dim=1], as the scripted runner

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        return torch.arange(start, end)

    def gather_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        return torch.zeros(1, 2, num_tokens, 1, 1)

    def gather_kv_layer(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return torch.zeros(2, len(slots), 1, 1)

    handoff_kv = gather_kv  # a hand-off's KV: the whole of it, as ModelRunner's
    handoff_kv_layer = gather_kv_layer

    def inject_kv(self, block_table: list[int], start: int, kv: torch.Tensor) -> None:
        """Nothing to keep: no step reads the KV back."""


def cost_model_parts(
    config: EngineConfig,
    *,
    encode_locally: bool,
    mm_cache: MMCache | None,
    clock: Clock,
    instance: str | None,
    costs: ComputeCosts,
) -> ModelParts:
    """A `PartsFactory` (epd.engine.factory): the cost-model runner, with the config's KV blocks."""
    model, blocks = config.model, config.cache.num_kv_blocks
    if blocks is None:
        raise ValueError("the simulator needs the KV block count (epd.sim.command.sim_engine_config)")
    device = torch.device(config.device)
    vision = scripted_vision(model, device, clock, costs) if encode_locally else None
    embedder = choose_embedder(vision, mm_cache, device, clock, instance)
    token = min(set(range(len(model.hf.eos_token_ids) + 1)) - set(model.hf.eos_token_ids))
    runner = CostModelRunner(model.hf.vision.spatial_merge_size, token, embedder, virtual_cost(clock, costs))
    return ModelParts(runner, blocks)


def cost_model_compute(costs: ComputeCosts) -> Compute:
    """Every forward and vision batch takes the time `costs` gives it; no tokens are computed."""
    return Compute(partial(cost_model_parts, costs=costs), partial(scripted_vision, costs=costs))
