"""The attention layer the LLM calls; the backend and KV cache slice are bound by the runner."""

from __future__ import annotations

import torch
from torch import nn

from epd.attention.backend import AttentionBackend, TorchSDPABackend
from epd.attention.context import get_forward_context


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim**-0.5
        self.backend: AttentionBackend = TorchSDPABackend()
        self.kv_cache: torch.Tensor | None = None  # [2, num_blocks, block_size, kv_heads, head_dim]

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        if self.kv_cache is None:
            raise RuntimeError("KV cache not bound: the model runner binds it before the first forward")
        meta = get_forward_context().metadata
        return self.backend.forward(q, k, v, self.kv_cache, meta, self.scale)
