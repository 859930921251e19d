"""The checkpoint's config as the simulator runs it: real wherever the simulation reads a size, narrow
where it would only fill memory and copy it.

An image's embeddings are [tokens, hidden]: 16 MB for one 1344 px image of a 7B model. Real-width
stand-ins cost more wall time than everything else in a simulation (made, cached, sent, cached
again, read), and each MM cache would be allocated and zeroed at its full size. Only the widths
are narrowed, to one column per attention head (head_dim 1, as the scripted KV has):

| what depends on the width             | kept real by                                              |
|---------------------------------------|-----------------------------------------------------------|
| bytes of an embedding transfer        | epd.sim.wire (charges the real model's bytes)              |
| tokens an MM cache holds              | `narrow_mm_cache_bytes`: the same block count, narrower    |
| KV blocks in --kv-cache-memory-bytes  | counted from the real config (epd.sim.command)             |
Token counts, grids, vocabulary and context length are untouched.
"""

from __future__ import annotations

import dataclasses

from epd.config import ModelConfig
from epd.engine.mm_cache import MMCache
from epd.models.config import VLModelConfig


@dataclasses.dataclass(frozen=True)
class NarrowModelConfig(ModelConfig):
    """A `ModelConfig` whose embeddings (vision output, LLM hidden) are `embed_width` wide."""

    def __post_init__(self) -> None:
        super().__post_init__()
        # `hf` is derived in __post_init__, as ModelConfig derives it: set once, never changed after.
        object.__setattr__(self, "hf", narrow_hf(self.hf))


def narrow_model(model: ModelConfig) -> NarrowModelConfig:
    init = {f.name: getattr(model, f.name) for f in dataclasses.fields(model) if f.init}
    return NarrowModelConfig(**init)


def embed_width(hf: VLModelConfig) -> int:
    return hf.text.num_attention_heads


def narrow_hf(hf: VLModelConfig) -> VLModelConfig:
    if hf.vision.out_hidden_size != hf.text.hidden_size:
        raise ValueError(
            f"vision output width {hf.vision.out_hidden_size} differs from the LLM's hidden size "
            f"{hf.text.hidden_size}: not a model the simulator knows how to narrow"
        )
    width = embed_width(hf)
    return dataclasses.replace(
        hf,
        text=dataclasses.replace(hf.text, hidden_size=width),
        vision=dataclasses.replace(hf.vision, out_hidden_size=width),
    )


def narrow_mm_cache_bytes(model: ModelConfig, memory_bytes: int, block_size: int) -> int:
    """The bytes that hold as many narrow MM cache blocks as `memory_bytes` holds real ones."""
    dtype = model.torch_dtype
    blocks = MMCache.blocks_for_memory(memory_bytes, block_size, model.hf.text.hidden_size, dtype)
    return blocks * block_size * embed_width(model.hf) * dtype.itemsize
