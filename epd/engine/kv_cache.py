"""The paged KV cache tensor: one preallocated tensor per device, shared by all layers.

Layout: [layers, 2 (K, V), num_blocks, block_size, kv_heads, head_dim]. Block ids index
dimension 2; the block manager decides which request owns which block.
"""

from __future__ import annotations

import torch
from torch import nn

from epd.attention.backend import AttentionBackend
from epd.models.config import TextConfig
from epd.models.layers.attention import PagedAttention


def bytes_per_block(cfg: TextConfig, block_size: int, dtype: torch.dtype) -> int:
    elem = torch.tensor([], dtype=dtype).element_size()
    return cfg.num_hidden_layers * 2 * block_size * cfg.num_key_value_heads * cfg.head_dim * elem


def num_blocks_for_memory(cfg: TextConfig, block_size: int, dtype: torch.dtype, memory_bytes: int) -> int:
    return memory_bytes // bytes_per_block(cfg, block_size, dtype)


def allocate_kv_cache(
    cfg: TextConfig, num_blocks: int, block_size: int, dtype: torch.dtype, device: str | torch.device
) -> torch.Tensor:
    shape = (cfg.num_hidden_layers, 2, num_blocks, block_size, cfg.num_key_value_heads, cfg.head_dim)
    return torch.zeros(shape, dtype=dtype, device=device)


def bind_kv_cache(model: nn.Module, kv_cache: torch.Tensor, backend: AttentionBackend) -> None:
    """Give every attention layer its slice of the cache and the backend to attend with."""
    layers = [m for m in model.modules() if isinstance(m, PagedAttention)]
    if len(layers) != kv_cache.shape[0]:
        raise ValueError(f"model has {len(layers)} attention layers, cache has {kv_cache.shape[0]}")
    for layer, layer_cache in zip(layers, kv_cache):
        layer.kv_cache = layer_cache
        layer.backend = backend
