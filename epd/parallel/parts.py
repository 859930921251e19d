"""The compute of one tensor-parallel rank, as the engine's `model_parts` factory.

| factory                   | runner                      | used by                                    |
|---------------------------|-----------------------------|--------------------------------------------|
| `instance_parts(group)`   | `ParallelRunner` on rank 0: | a tensor-parallel instance: one engine on  |
|                           | drives the workers          | rank 0, workers that only execute          |
|                           |                             | (epd.parallel.worker builds theirs alike)  |
| `rank_model_parts(group)` | the rank's own ModelRunner  | the workers; and one full engine per rank  |
|                           |                             | (tests: ranks see identical logits)        |

`LLMEngine(config, tokenizer, model_parts=rank_model_parts(group))` runs an engine on one rank:
the model holds the rank's share, the KV cache its kv heads, and every rank computes the same
logits (the all-reduces leave identical hidden states everywhere, the embedding is replicated
and the vocabulary-split head all-gathers its logits). Engines on all ranks fed the same
requests therefore schedule and sample alike (greedy; seeded sampling likewise). An instance
instead schedules on rank 0 only and sends each step to the others (`instance_parts`).

CUDA graphs (decode steps, epd.engine.cuda_graphs) are captured by every rank's runner as it is
built: the ranks build together (rank 0 when it sends `BuildRank`, each worker when it receives
it), from the same config, so they capture the same sizes in the same order, and each size's
warm-up forward runs its all-reduces on every rank. A worker's graphs (`logits=False`) end at
the hidden states.
"""

from __future__ import annotations

from dataclasses import replace

import torch

from epd.clock import Clock
from epd.config import EngineConfig
from epd.engine.factory import ModelParts, PartsFactory, load_model_parts, parts_around
from epd.engine.kv_cache import num_blocks_for_memory
from epd.engine.memory import resolve_kv_cache_bytes
from epd.engine.mm_cache import MMCache
from epd.models.qwen2_vl import ALL_PARTS, LANGUAGE
from epd.parallel.build import build_rank_model
from epd.parallel.commands import BuildRank
from epd.parallel.group import TensorParallelGroup, is_parallel
from epd.parallel.runner import ParallelRunner
from epd.parallel.sharding import HeadSplit


def instance_parts(group: TensorParallelGroup | None, sends_by_rank: bool = False) -> PartsFactory:
    """The engine's compute on rank 0 of an instance whose workers wait in
    `epd.parallel.worker.build_worker`: they build their shares along with rank 0's, and rank 0's
    runner drives them. `load_model_parts` itself at degree 1. Builds once: a second engine would
    need workers that build again (a role switch that rebuilds the engine: not supported).
    `sends_by_rank`: the workers were built with connectors, to send their heads of hand-offs."""
    if not is_parallel(group):
        return load_model_parts
    load_share = rank_model_parts(group)
    built = []

    def load(
        config: EngineConfig,
        *,
        encode_locally: bool,
        mm_cache: MMCache | None,
        clock: Clock,
        instance: str | None,
    ) -> ModelParts:
        if built:
            raise RuntimeError(
                f"tensor-parallel instance {instance}: its workers built their share once already"
            )
        built.append(instance)
        group.send_command(BuildRank(config, instance))
        parts = load_share(
            config, encode_locally=encode_locally, mm_cache=mm_cache, clock=clock, instance=instance
        )
        text = config.model.hf.text
        heads = HeadSplit(text.num_attention_heads, text.num_key_value_heads, group.world_size)
        runner = ParallelRunner(parts.runner, group, heads, sends_by_rank)
        return ModelParts(runner, parts.num_blocks, parts.model)

    return load


def rank_model_parts(group: TensorParallelGroup | None, logits: bool = True) -> PartsFactory:
    """`epd.engine.factory.load_model_parts` for `group.rank`; that very factory at degree 1.
    `logits` False: a worker's, which encodes nothing and whose decode graphs end at the hidden
    states (rank 0 alone samples)."""
    if not is_parallel(group):
        return load_model_parts

    def load(
        config: EngineConfig,
        *,
        encode_locally: bool,
        mm_cache: MMCache | None,
        clock: Clock,
        instance: str | None,
    ) -> ModelParts:
        mc = config.model
        model = build_rank_model(
            mc.model,
            group,
            parts=ALL_PARTS if encode_locally else frozenset({LANGUAGE}),
            dtype=mc.torch_dtype,
            device=torch.device(config.device),
            load_format=mc.load_format,
            seed=mc.seed,
        )
        config = _rank_engine_config(config, model, group)
        if not logits and (encode_locally or mm_cache is not None):
            raise ValueError("a rank without logits (a worker) gets no images to encode or read")
        return parts_around(
            model,
            config,
            encode_locally=encode_locally,
            mm_cache=mm_cache,
            clock=clock,
            instance=instance,
            graph_logits=logits,
        )

    return load


def _rank_engine_config(
    config: EngineConfig, model: torch.nn.Module, group: TensorParallelGroup
) -> EngineConfig:
    """What `parts_around` builds a rank's runner from: a block count every rank agrees on, sized
    for this rank's kv heads. CUDA graphs as the config says (every rank decides alike: the same
    config, devices of one kind)."""
    cc = config.cache
    num_blocks = cc.num_kv_blocks or num_blocks_for_memory(
        model.config.text, cc.block_size, config.model.torch_dtype, resolve_kv_cache_bytes(config, model)
    )
    # One block manager (rank 0's, later) hands out block ids that index every rank's cache.
    agreed = group.all_reduce(torch.tensor([num_blocks], device=config.device), op="min")
    return replace(config, cache=replace(cc, num_kv_blocks=int(agreed.item())))
