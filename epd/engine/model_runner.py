"""Turns a scheduled batch into tensors, runs the model, returns next-token logits.

Hot path: everything here runs once per step. Keep per-token Python work out of it where
a tensor op will do; per-request loops are fine.
"""

from __future__ import annotations

import torch

from epd.attention.backend import get_attention_backend
from epd.attention.context import AttentionMetadata, forward_context
from epd.engine.embedders import ImageEmbedder
from epd.engine.kv_cache import allocate_kv_cache, bind_kv_cache
from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch
from epd.models.mrope import decode_positions


class ModelRunner:
    def __init__(
        self,
        model: torch.nn.Module,
        num_blocks: int,
        block_size: int,
        device: torch.device,
        dtype: torch.dtype,
        embedder: ImageEmbedder,
        attention_backend: str = "torch_sdpa",
    ) -> None:
        self.model = model
        self.device = device
        self.block_size = block_size
        self.embedder = embedder
        self.merge_size = model.config.vision.spatial_merge_size
        self.kv_cache = allocate_kv_cache(model.config.text, num_blocks, block_size, dtype, device)
        bind_kv_cache(model, self.kv_cache, get_attention_backend(attention_backend))

    def _slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        bs = self.block_size
        return torch.tensor(
            [block_table[i // bs] * bs + i % bs for i in range(start, end)], device=self.device
        )

    def gather_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """A copy of the first num_tokens tokens' KV: [layers, 2, num_tokens, kv_heads, head_dim]."""
        flat = self.kv_cache.flatten(2, 3)  # [layers, 2, blocks * block_size, kv_heads, head_dim]
        return flat.index_select(2, self._slots(block_table, 0, num_tokens))

    def inject_kv(self, block_table: list[int], start: int, kv: torch.Tensor) -> None:
        """Write KV rows start..len(kv) (computed elsewhere) into this request's blocks."""
        end = kv.shape[2]
        flat = self.kv_cache.flatten(2, 3)
        flat.index_copy_(
            2, self._slots(block_table, start, end), kv[:, :, start:end].to(flat.device, flat.dtype)
        )

    @torch.inference_mode()
    def run(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> torch.Tensor:
        """Logits [len(batch), vocab] at the last new token of every scheduled request."""
        self.embedder.ensure(batch.requests)
        inputs = _BatchInputs.build(batch, block_tables, self.block_size)
        ids = torch.tensor(inputs.token_ids, device=self.device)
        mm_embeds, mm_index = self._gather_image_rows(batch)
        embeds = self.model.embed_tokens(ids, mm_embeds, mm_index)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(inputs.slots, device=self.device),
            query_starts=inputs.query_starts,
            query_lens=batch.num_new_tokens,
            seq_lens=inputs.seq_lens,
            block_tables=block_tables,
            block_size=self.block_size,
        )
        with forward_context(meta):
            hidden = self.model(embeds, torch.cat(inputs.positions, dim=1).to(self.device))
        last = torch.tensor(
            [s + n - 1 for s, n in zip(inputs.query_starts, batch.num_new_tokens)], device=self.device
        )
        return self.model.compute_logits(hidden[last]).float()

    def _gather_image_rows(self, batch: ScheduledBatch) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Image embedding rows that fall in this step's new tokens, and their flat-batch rows."""
        rows, index, start = [], [], 0
        for req, n in zip(batch.requests, batch.num_new_tokens):
            lo, hi = req.num_computed_tokens, req.num_computed_tokens + n
            for ph, emb in zip(req.prompt.placeholders, req.image_embeds):
                a, b = max(lo, ph.offset), min(hi, ph.end)
                if a < b:
                    rows.append(emb[a - ph.offset : b - ph.offset])
                    index.append(torch.arange(a - lo, b - lo) + start)
            start += n
        if not rows:
            return None, None
        return torch.cat(rows), torch.cat(index).to(self.device)


class _BatchInputs:
    """Flat token ids, positions and KV slots of one step, built request by request."""

    def __init__(self) -> None:
        self.token_ids: list[int] = []
        self.positions: list[torch.Tensor] = []
        self.slots: list[int] = []
        self.query_starts: list[int] = []
        self.seq_lens: list[int] = []

    @classmethod
    def build(cls, batch: ScheduledBatch, block_tables: list[list[int]], block_size: int) -> _BatchInputs:
        out = cls()
        for req, n, table in zip(batch.requests, batch.num_new_tokens, block_tables):
            lo, hi = req.num_computed_tokens, req.num_computed_tokens + n
            out.query_starts.append(len(out.token_ids))
            out.token_ids.extend(req.all_token_ids[lo:hi])
            out.positions.append(_positions(req, lo, hi))
            out.slots.extend(table[i // block_size] * block_size + i % block_size for i in range(lo, hi))
            out.seq_lens.append(hi)
        return out


def _positions(req: Request, lo: int, hi: int) -> torch.Tensor:
    """M-RoPE positions of tokens lo..hi-1: from the prompt layout, then continuing by delta."""
    split = min(max(lo, req.num_prompt_tokens), hi)
    parts = []
    if lo < split:
        parts.append(req.prompt_positions[:, lo:split])
    if split < hi:
        parts.append(decode_positions(split, hi - split, req.mrope_delta))
    return torch.cat(parts, dim=1)
