"""Attention backends: store the step's K/V into the paged cache, then attend over it.

Contract for every backend:
- `kv_cache` is one layer's slice of the cache, [2, num_blocks, block_size, kv_heads, head_dim];
- `forward` first writes k/v of every new token to its slot, then computes causal attention
  of each sequence's queries over its whole context (cached tokens + new ones);
- the result equals plain causal softmax attention over the unpaged sequence.
"""

from __future__ import annotations

import importlib.util
from abc import ABC, abstractmethod
from collections.abc import Callable

import torch
from torch.nn import functional as F

from epd.attention.context import AttentionMetadata


class AttentionBackend(ABC):
    name: str
    # Whether `forward` may be captured in a CUDA graph: launch shapes depend only on tensor
    # shapes and `meta.tensors`, never on host lists or on values read back from the device.
    supports_cuda_graphs: bool = False
    # Whether `forward` reads the batch layout from `meta.tensors` (device copies); the runner
    # then builds them. When false `meta.tensors` may be None.
    needs_device_metadata: bool = False

    @abstractmethod
    def forward(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        kv_cache: torch.Tensor,
        meta: AttentionMetadata,
        scale: float,
    ) -> torch.Tensor:
        """q: [tokens, heads, dim]; k, v: [tokens, kv_heads, dim] -> [tokens, heads, dim]."""


def write_kv(k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    kv_heads, dim = k.shape[1:]
    kv_cache[0].view(-1, kv_heads, dim).index_copy_(0, slot_mapping, k)
    kv_cache[1].view(-1, kv_heads, dim).index_copy_(0, slot_mapping, v)


def gather_kv(
    kv_cache: torch.Tensor, block_table: list[int], seq_len: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """The first seq_len tokens of one sequence's K and V: [seq_len, kv_heads, dim] each."""
    blocks = torch.tensor(block_table, device=kv_cache.device)
    kv = kv_cache[:, blocks].flatten(1, 2)[:, :seq_len]
    return kv[0], kv[1]


class TorchSDPABackend(AttentionBackend):
    """Reference backend for any device: gather each sequence's context, then SDPA.

    Simple and exact, not fast: one gather and one kernel call per sequence.
    """

    name = "torch_sdpa"

    def forward(self, q, k, v, kv_cache, meta, scale):
        write_kv(k, v, kv_cache, meta.slot_mapping)
        out = torch.empty_like(q)
        for i in range(meta.num_seqs):
            start, q_len, seq_len = meta.query_starts[i], meta.query_lens[i], meta.seq_lens[i]
            keys, values = gather_kv(kv_cache, meta.block_tables[i], seq_len)
            out[start : start + q_len] = _causal_attention(q[start : start + q_len], keys, values, scale)
        return out


def _causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Queries are the last q_len positions of the k/v sequence."""
    q_len, kv_len = q.shape[0], k.shape[0]
    groups = q.shape[1] // k.shape[1]
    q, k, v = (t.transpose(0, 1) for t in (q, k, v))
    if groups > 1:
        k = k.repeat_interleave(groups, dim=0)
        v = v.repeat_interleave(groups, dim=0)
    if q_len == kv_len:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=q_len > 1, scale=scale)
    else:
        # Query i sits at position kv_len - q_len + i and sees keys up to there.
        mask = torch.ones(q_len, kv_len, dtype=torch.bool, device=q.device).tril(kv_len - q_len)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def _triton_backend() -> AttentionBackend:
    from epd.attention.triton_backend import TritonBackend  # needs triton and a GPU

    return TritonBackend()


# Name -> factory. Factories import lazily so a CPU-only install never imports triton.
_BACKENDS: dict[str, Callable[[], AttentionBackend]] = {
    TorchSDPABackend.name: TorchSDPABackend,
    "triton": _triton_backend,
}


def resolve_backend_name(name: str, device: torch.device | str | None) -> str:
    """ "auto" -> the fastest backend that runs on `device`: "triton" on CUDA when Triton is
    installed, else "torch_sdpa". Any other name is returned as given."""
    if name != "auto":
        return name
    if device is not None and torch.device(device).type == "cuda" and importlib.util.find_spec("triton"):
        return "triton"
    return TorchSDPABackend.name


def get_attention_backend(
    name: str = "torch_sdpa", device: torch.device | str | None = None
) -> AttentionBackend:
    """The backend called `name` ("auto": see `resolve_backend_name`)."""
    name = resolve_backend_name(name, device)
    if name not in _BACKENDS:
        raise ValueError(f"unknown attention backend {name!r}; available: {sorted(_BACKENDS)} or 'auto'")
    return _BACKENDS[name]()
