"""The GPU attention backend: Triton kernels over the paged KV cache.

Hot path. Per layer and step: one K/V write (one launch for K and V), then one kernel launch
(prefill, or mixed steps) or two (decode with split-K: partials, then the merge). No
per-sequence Python loop, no host sync, so decode steps can be captured in CUDA graphs.

    pure decode  (every sequence has 1 new token)  -> triton_decode: GQA-grouped, split-K
    otherwise    (prefill, prefix hits, mixed)      -> triton_prefill: varlen causal tiles,
                 except long fresh prompts (no cached prefix) in 16-bit -> torch SDPA each
"""

from __future__ import annotations

import torch
from torch.nn import functional as F

from epd.attention.backend import AttentionBackend
from epd.attention.context import AttentionMetadata, DeviceMetadata, build_device_metadata
from epd.attention.triton_common import write_kv
from epd.attention.triton_decode import choose_launch, paged_decode_attention
from epd.attention.triton_prefill import paged_prefill_attention

SDPA_MIN_TOKENS = 512  # fresh prompts at least this long take torch SDPA (see TritonBackend._prefill)


class TritonBackend(AttentionBackend):
    name = "triton"
    supports_cuda_graphs = True
    needs_device_metadata = True

    def __init__(self) -> None:
        self._num_sms: int | None = None

    def forward(self, q, k, v, kv_cache, meta, scale):
        write_kv(k, v, kv_cache, meta.slot_mapping)
        tensors = meta.tensors or _tensors_of(meta, q.device)
        if tensors.decode_only:
            splits, launch = choose_launch(
                q.shape[0], kv_cache.shape[3], q.shape[2], tensors.max_seq_len, self._sms(q)
            )
            return paged_decode_attention(
                q, kv_cache[0], kv_cache[1], tensors.block_tables, tensors.seq_lens, scale, splits,
                launch=launch,
            )  # fmt: skip
        return self._prefill(q, k, v, kv_cache, meta, tensors, scale)

    def _prefill(self, q, k, v, kv_cache, meta, tensors, scale) -> torch.Tensor:
        """Long prompts with nothing cached go to torch SDPA (FlashAttention), which was 1.3-1.8x
        faster than the Triton kernel on 1k-8k tokens (H200, bf16); the Triton kernel takes the
        rest (prefix hits, short prompts, decodes of a mixed step) in one launch."""
        out = torch.empty_like(q)
        query_lens = list(meta.query_lens)
        if q.dtype in (torch.bfloat16, torch.float16) and q.is_cuda:
            for i, (start, n) in enumerate(zip(meta.query_starts, meta.query_lens)):
                if n >= SDPA_MIN_TOKENS and n == meta.seq_lens[i]:
                    rows = slice(start, start + n)
                    out[rows] = _sdpa_causal(q[rows], k[rows], v[rows], scale)
                    query_lens[i] = 0  # no tiles for it in the kernel below
        if any(query_lens):
            paged_prefill_attention(
                q, kv_cache[0], kv_cache[1], tensors.block_tables, tensors.query_starts, tensors.seq_lens,
                query_lens, scale, out,
            )  # fmt: skip
        return out

    def _sms(self, q: torch.Tensor) -> int:
        if self._num_sms is None:
            # On the CPU (Triton's interpreter, in tests) any figure will do.
            cuda = q.is_cuda
            self._num_sms = torch.cuda.get_device_properties(q.device).multi_processor_count if cuda else 8
        return self._num_sms


def _tensors_of(meta: AttentionMetadata, device: torch.device) -> DeviceMetadata:
    """For callers that gave only the host lists (tests, tools): build the device copy here."""
    return build_device_metadata(meta.query_lens, meta.seq_lens, meta.block_tables, device)


def _sdpa_causal(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float) -> torch.Tensor:
    """Causal attention of one whole sequence, [tokens, heads, dim] in and out, in the layout
    the flash kernels take: batch of 1, heads-major, contiguous, K/V expanded to every head."""
    group = q.shape[1] // k.shape[1]
    q4 = q.transpose(0, 1).unsqueeze(0).contiguous()
    k4, v4 = (t.transpose(0, 1).repeat_interleave(group, 0).unsqueeze(0) for t in (k, v))
    out = F.scaled_dot_product_attention(q4, k4, v4, is_causal=True, scale=scale)
    return out[0].transpose(0, 1)
