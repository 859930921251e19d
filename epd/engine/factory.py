"""What an engine computes with, built apart from the engine so that it can be replaced.

`LLMEngine` schedules, samples and keeps requests; the compute comes from a `ModelParts`
factory:

| factory              | runner                    | model          | used by                          |
|----------------------|---------------------------|----------------|----------------------------------|
| `load_model_parts`   | `ModelRunner`             | real weights   | production, the token-exact tests|
|                      |                           | (or dummy)     |                                  |
| `scripted_parts`     | `ScriptedRunner`          | none           | core tests of scheduling, hand-  |
| (epd.engine.         | (tokens from the KV it    |                | offs and routing; later a cost   |
|  scripted_runner)    |  holds; no model)         |                | model for the simulator          |
| `epd.parallel.parts. | `ParallelRunner` (rank 0  | rank 0's share | a tensor-parallel instance       |
|  instance_parts`     |  of an instance, driving  |                | (`@tpN` layouts)                 |
|                      |  its workers)             |                |                                  |

A factory may also give the engine what encodes images ahead (`ahead_tower`, epd.engine.encode_ahead)
in place of the engine's own thread: the simulator's lane on virtual time (epd.sim.tower_lane).

A runner is whatever offers `merge_size`, `embedder`, `run`, `inject_kv`, `gather_kv`, `slots`,
`gather_kv_layer`, `handoff_kv` and `handoff_kv_layer` as `ModelRunner` does (epd.engine.model_runner).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch

from epd.clock import Clock
from epd.config import EngineConfig
from epd.engine.embedders import CachedEmbeddings, ImageEmbedder, LocalEncoder, NoEmbeddings
from epd.engine.encode_ahead import AheadTower
from epd.engine.kv_cache import num_blocks_for_memory
from epd.engine.memory import resolve_kv_cache_bytes
from epd.engine.mm_cache import MMCache
from epd.engine.model_runner import ModelRunner
from epd.models.loader import build_model
from epd.models.qwen2_vl import ALL_PARTS, LANGUAGE


@dataclass
class ModelParts:
    runner: Any  # ModelRunner, or anything with its interface (see the module docstring)
    num_blocks: int  # KV blocks the runner holds for the block manager
    model: torch.nn.Module | None = None  # the loaded model, when there is one
    ahead_tower: AheadTower | None = None  # encodes ahead, if the engine does; None: a thread of its own


class PartsFactory(Protocol):
    def __call__(
        self,
        config: EngineConfig,
        *,
        encode_locally: bool,
        mm_cache: MMCache | None,
        clock: Clock,
        instance: str | None,
    ) -> ModelParts: ...


def load_model_parts(
    config: EngineConfig,
    *,
    encode_locally: bool,
    mm_cache: MMCache | None,
    clock: Clock,
    instance: str | None,
) -> ModelParts:
    """The model from its checkpoint (only the parts this engine needs), its KV cache and runner."""
    mc = config.model
    parts = ALL_PARTS if encode_locally else frozenset({LANGUAGE})
    model = build_model(
        mc.model,
        parts=parts,
        dtype=mc.torch_dtype,
        device=torch.device(config.device),
        load_format=mc.load_format,
        seed=mc.seed,
    )
    return parts_around(
        model, config, encode_locally=encode_locally, mm_cache=mm_cache, clock=clock, instance=instance
    )


def parts_around(
    model: torch.nn.Module,
    config: EngineConfig,
    *,
    encode_locally: bool,
    mm_cache: MMCache | None,
    clock: Clock,
    instance: str | None,
    graph_logits: bool = True,
) -> ModelParts:
    """A loaded `model`'s KV cache (sized from what it leaves of the device) and runner;
    `graph_logits` False: its decode graphs end at the hidden states (a tensor-parallel worker)."""
    mc, cc = config.model, config.cache
    device = torch.device(config.device)
    num_blocks = cc.num_kv_blocks or num_blocks_for_memory(
        mc.hf.text, cc.block_size, mc.torch_dtype, resolve_kv_cache_bytes(config, model)
    )
    embedder = choose_embedder(model if encode_locally else None, mm_cache, device, clock, instance)
    runner = ModelRunner(
        model,
        num_blocks,
        cc.block_size,
        device,
        mc.torch_dtype,
        embedder,
        config.attention_backend,
        config.cuda_graphs,
        config.scheduler.max_num_seqs,
        graph_logits=graph_logits,
    )
    return ModelParts(runner, num_blocks, model)


def choose_embedder(
    vision_model: torch.nn.Module | None,
    mm_cache: MMCache | None,
    device: torch.device,
    clock: Clock,
    instance: str | None,
) -> ImageEmbedder:
    """Where a prefill gets image embeddings: its own vision tower, the MM cache (filled by
    encoder instances), or nowhere (decode-only)."""
    if vision_model is not None:
        return LocalEncoder(vision_model, device, clock, instance)
    return CachedEmbeddings(mm_cache) if mm_cache is not None else NoEmbeddings()
