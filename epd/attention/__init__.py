"""Attention over the paged KV cache, behind a small backend interface."""

from epd.attention.backend import AttentionBackend, get_attention_backend
from epd.attention.context import AttentionMetadata, forward_context, get_forward_context

__all__ = [
    "AttentionBackend",
    "AttentionMetadata",
    "forward_context",
    "get_attention_backend",
    "get_forward_context",
]
