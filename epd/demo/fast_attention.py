"""One padded SDPA call for transformers' Qwen2.5-VL vision attention, for training only.

Without flash-attention, transformers runs the vision attention one window (or one image)
at a time: a training batch of ~100 images makes hundreds of tiny kernel launches per
layer, forward and backward. Here the sequences of `cu_seqlens` are gathered into a
padded [num_seqs, heads, max_len, head_dim] batch with a key mask, attended in one call
and scattered back. Same maths (tests/demo/test_fast_attention.py checks it against the
original); the saved checkpoint does not depend on it.
"""

from __future__ import annotations

import types
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F


def padded_vision_attention(
    self: torch.nn.Module,
    hidden_states: torch.Tensor,
    cu_seqlens: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor] | None = None,
    **kwargs: object,
) -> torch.Tensor:
    """Drop-in `forward` for `Qwen2_5_VLVisionAttention` (bound to the module as `self`)."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb_vision

    seq_len = hidden_states.shape[0]
    q, k, v = self.qkv(hidden_states).reshape(seq_len, 3, self.num_heads, -1).permute(1, 0, 2, 3).unbind(0)
    cos, sin = position_embeddings
    q, k = apply_rotary_pos_emb_vision(q, k, cos, sin)
    index, valid = _padding_index(cu_seqlens.to(hidden_states.device), seq_len)
    # [num_seqs, max_len, heads, dim] -> [num_seqs, heads, max_len, dim]
    q, k, v = (x[index].transpose(1, 2) for x in (q, k, v))
    mask = valid[:, None, None, :]  # keys only: padded queries see real keys and are dropped below
    out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scaling)
    out = out.transpose(1, 2)[valid]  # row-major over (seq, position) = the original token order
    return self.proj(out.reshape(seq_len, -1))


def _padding_index(cu_seqlens: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Gather index [num_seqs, max_len] into the packed tokens, and which of its entries are real."""
    starts = cu_seqlens[:-1].long()
    lengths = cu_seqlens[1:].long() - starts
    max_len = int(lengths.max())
    offsets = torch.arange(max_len, device=cu_seqlens.device)
    valid = offsets[None, :] < lengths[:, None]
    index = (starts[:, None] + offsets[None, :]).clamp(max=seq_len - 1)
    return index, valid


@contextmanager
def fast_vision_attention(model: torch.nn.Module) -> Iterator[int]:
    """Within the block, every vision attention module of `model` runs `padded_vision_attention`.

    Yields how many modules were patched; restores the original forwards on exit.
    """
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import Qwen2_5_VLVisionAttention

    modules = [m for m in model.modules() if isinstance(m, Qwen2_5_VLVisionAttention)]
    for m in modules:
        m.forward = types.MethodType(padded_vision_attention, m)
    try:
        yield len(modules)
    finally:
        for m in modules:
            del m.forward  # back to the class's forward
