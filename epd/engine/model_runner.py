"""Turns a scheduled batch into tensors, runs the model, returns next-token logits.

Hot path: everything here runs once per step. Keep per-token Python work out of it where
a tensor op will do; per-request loops are fine.

Two ways through a step:
- a pure decode step (one new token per sequence, no image rows) on a backend that allows
  it replays a CUDA graph (`epd.engine.cuda_graphs`);
- anything else runs eagerly, with the batch layout also sent to the device in one copy
  for backends whose kernels read it there. Only an eager step can call back between
  layers (`after_layer`: layer-wise KV streaming from a prefill instance).
A step with a prefill chunk (chunked prefill mixes them with decodes) is never a pure decode,
even a chunk of one prompt token: its position comes from the prompt's M-RoPE layout, and it
may be an image row. A chunk starts at any token, like a prefix-cache hit but not on a block
boundary, and may end inside an image's placeholder span: the image rows that fall in the step
are placed by `_gather_image_rows`, the rest come with the later chunks.

A step is `prepare`d (requests read, images encoded, the result plain data: `StepInputs`), then
run (`forward`). A tensor-parallel instance sends the prepared step to its workers, which run
`forward` on their share of the model (epd.parallel.runner).
"""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from epd.attention.backend import get_attention_backend
from epd.attention.context import AttentionMetadata, build_device_metadata, forward_context
from epd.engine.cuda_graphs import DecodeGraphs, graph_sizes
from epd.engine.embedders import ImageEmbedder
from epd.engine.kv_cache import allocate_kv_cache, bind_kv_cache
from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch
from epd.models.mrope import decode_positions
from epd.models.qwen2_llm import Qwen2Model


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
        cuda_graphs: bool | None = None,
        max_num_seqs: int | None = None,
        graph_logits: bool = True,
    ) -> None:
        """`attention_backend`: a registered name or "auto" (epd.attention.backend).
        `cuda_graphs`: replay decode steps as CUDA graphs; None: whenever the device is CUDA
        and the backend allows it. `max_num_seqs` (the scheduler's limit) bounds the batch
        sizes captured. `graph_logits` False: the graphs stop at the hidden states, and
        `forward` then serves only `logits=False` (a tensor-parallel worker's runner), unless
        the LM head is a collective (vocabulary split over the ranks, epd.parallel.linear): then
        every rank runs it, and a worker drops what it gathered."""
        self.model = model
        # A head every rank must call in each step (its all-gather pairs up across the ranks).
        self.head_gathers = getattr(getattr(model, "lm_head", None), "gathers", False)
        self.device = torch.device(device)
        self.block_size = block_size
        self.embedder = embedder
        self.merge_size = model.config.vision.spatial_merge_size
        self.language = _language_model(model)
        self.backend = get_attention_backend(attention_backend, self.device)
        if cuda_graphs is None:
            cuda_graphs = self.device.type == "cuda" and self.backend.supports_cuda_graphs
        if cuda_graphs and not (self.device.type == "cuda" and self.backend.supports_cuda_graphs):
            raise ValueError(
                f"CUDA graphs need a CUDA device and a backend that allows them ({self.backend.name})"
            )
        # With graphs, one block past the block manager's is the padding rows' scratch block.
        num_blocks_held = num_blocks + int(cuda_graphs)
        self.kv_cache = allocate_kv_cache(model.config.text, num_blocks_held, block_size, dtype, device)
        bind_kv_cache(model, self.kv_cache, self.backend)
        self.graphs: DecodeGraphs | None = None
        if cuda_graphs:
            text = model.config.text
            width = min(num_blocks, -(-text.max_position_embeddings // block_size))
            sizes = graph_sizes(max_num_seqs)
            with_head = graph_logits or self.head_gathers
            self.graphs = DecodeGraphs(model, block_size, num_blocks, width, self.device, sizes, with_head)
            self.graphs.capture_all()

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        """Flat cache rows (block * block_size + offset) of tokens start..end-1, on the device."""
        bs = self.block_size
        # dtype given: with nothing to copy (a hand-off whose KV D's prefix cache already holds
        # in full) an empty list would make a float tensor, which index_copy_ refuses.
        return torch.tensor(
            [block_table[i // bs] * bs + i % bs for i in range(start, end)],
            dtype=torch.long,
            device=self.device,
        )

    def gather_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        """A copy of the first num_tokens tokens' KV: [layers, 2, num_tokens, kv_heads, head_dim]."""
        flat = self.kv_cache.flatten(2, 3)  # [layers, 2, blocks * block_size, kv_heads, head_dim]
        return flat.index_select(2, self.slots(block_table, 0, num_tokens))

    def gather_kv_layer(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        """A copy of one layer's KV at `slots` (see `slots`): [2, len(slots), kv_heads, head_dim].
        Queued on the current stream, so inside a forward it reads what the layer just wrote."""
        return self.kv_cache[layer].flatten(1, 2).index_select(1, slots)

    # What a hand-off sends: a copy of the whole KV, as for any other use (a tensor-parallel
    # runner leaves each rank's heads to it instead, epd.parallel.runner).
    handoff_kv = gather_kv
    handoff_kv_layer = gather_kv_layer

    def inject_kv(self, block_table: list[int], start: int, kv: torch.Tensor) -> None:
        """Write KV rows start..len(kv) (computed elsewhere) into this request's blocks."""
        self.write_kv_rows(block_table, start, kv[:, :, start:])

    def write_kv_rows(self, block_table: list[int], start: int, rows: torch.Tensor) -> None:
        """Write the KV of tokens start..start+len(rows) ([layers, 2, tokens, kv_heads, head_dim])
        into this request's blocks: `inject_kv` without the rows before `start`."""
        flat = self.kv_cache.flatten(2, 3)
        slots = self.slots(block_table, start, start + rows.shape[2])
        flat.index_copy_(2, slots, rows.to(flat.device, flat.dtype))

    @torch.inference_mode()
    def run(
        self,
        batch: ScheduledBatch,
        block_tables: list[list[int]],
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits [len(batch), vocab] at the last new token of every scheduled request, in the
        model dtype (the sampler converts where it needs float32). Read them before the next run:
        a graph step returns a view of the graph's output. A chunk that ends inside its prompt
        gets a row too (one row: cheaper than a second layout); the engine samples none from it.

        `after_layer(i)` is called once layer i has written its KV (the step then runs eagerly)."""
        return self.forward(self.prepare(batch, block_tables), after_layer)

    @torch.inference_mode()
    def prepare(self, batch: ScheduledBatch, block_tables: list[list[int]]) -> StepInputs:
        """The step as plain data (`StepInputs`): what `forward` needs, without the requests."""
        self.embedder.ensure(batch.requests, batch.token_ends())
        inputs = StepInputs.build(batch, block_tables, self.block_size)
        inputs.mm_embeds, inputs.mm_index = self._gather_image_rows(batch)
        return inputs

    @torch.inference_mode()
    def forward(
        self,
        step: StepInputs,
        after_layer: Callable[[int], None] | None = None,
        logits: bool = True,
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        """Run a prepared step (`run`'s result); `logits` False: only the forward, which writes the
        step's KV (a tensor-parallel worker: rank 0 alone samples). `token_ids` [tokens], given:
        the step's token ids on the device, in place of `step.token_ids` (placeholders there: async
        scheduling feeds a step the tokens the step before sampled, before the host knows them).

        Whether a graph runs the step depends on the step alone, never on `logits`: the ranks of
        a tensor-parallel instance, fed the same step, must all replay (or all run eagerly) for
        their all-reduces to pair up."""
        if step.mm_embeds is None and after_layer is None and self._graph_fits(step):
            if logits and not self.graphs.logits:
                raise RuntimeError("this runner's graphs end at the hidden states: it computes no logits")
            out = self.graphs.run(
                step.token_ids, step.decode_positions, step.slots, step.seq_lens, step.block_tables, token_ids
            )
            return out if logits else None
        return self._run_eager(step, after_layer, logits, token_ids)

    def _graph_fits(self, step: StepInputs) -> bool:
        return (
            self.graphs is not None
            and step.decode_positions is not None
            and self.graphs.padded_size(len(step.seq_lens)) is not None
        )

    def _run_eager(
        self,
        step: StepInputs,
        after_layer: Callable[[int], None] | None,
        logits: bool,
        token_ids: torch.Tensor | None = None,
    ) -> torch.Tensor | None:
        ids = torch.tensor(step.token_ids, device=self.device) if token_ids is None else token_ids
        mm_index = None if step.mm_index is None else step.mm_index.to(self.device)
        embeds = self.model.embed_tokens(ids, step.mm_embeds, mm_index)
        tensors = None
        if self.backend.needs_device_metadata:
            tensors = build_device_metadata(step.query_lens, step.seq_lens, step.block_tables, self.device)
        meta = AttentionMetadata(
            slot_mapping=torch.tensor(step.slots, device=self.device),
            query_starts=step.query_starts,
            query_lens=step.query_lens,
            seq_lens=step.seq_lens,
            block_tables=step.block_tables,
            block_size=self.block_size,
            tensors=tensors,
        )
        hooked = nullcontext() if after_layer is None else self.language.after_each_layer(after_layer)
        with forward_context(meta), hooked:
            hidden = self.model(embeds, step.positions_tensor().to(self.device))
        if not logits and not self.head_gathers:
            return None
        last = torch.tensor(
            [s + n - 1 for s, n in zip(step.query_starts, step.query_lens)], device=self.device
        )
        out = self.model.compute_logits(hidden[last])
        return out if logits else None

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
        return torch.cat(rows), torch.cat(index)  # the index moves to the device in forward


@dataclass
class StepInputs:
    """One step as plain data: flat token ids, KV slots, positions, block tables, image rows.

    Built request by request on the instance (`build`); holds no request, so that a
    tensor-parallel instance sends it as is to its workers (epd.parallel.runner), every tensor
    but `mm_embeds` on the host. `decode_positions` is set (one text position per request) when
    every request has exactly one new token past its prompt: the case a CUDA graph replays, whose
    M-RoPE positions follow from it; other steps carry `positions` [3, tokens].
    """

    token_ids: list[int] = field(default_factory=list)
    slots: list[int] = field(default_factory=list)
    query_starts: list[int] = field(default_factory=list)
    query_lens: list[int] = field(default_factory=list)
    seq_lens: list[int] = field(default_factory=list)
    block_tables: list[list[int]] = field(default_factory=list)
    decode_positions: list[int] | None = None
    positions: torch.Tensor | None = None
    mm_embeds: torch.Tensor | None = None  # image rows of this step's tokens, on the device
    mm_index: torch.Tensor | None = None  # their rows in the flat batch

    @classmethod
    def build(cls, batch: ScheduledBatch, block_tables: list[list[int]], block_size: int) -> StepInputs:
        out = cls(query_lens=list(batch.num_new_tokens), block_tables=block_tables)
        token_ids, slots, positions = out.token_ids, out.slots, []
        ranges: list[tuple[Request, int, int]] = []  # (request, lo, hi) of its new tokens
        for req, n, table in zip(batch.requests, batch.num_new_tokens, block_tables):
            lo = req.num_computed_tokens
            hi, num_prompt = lo + n, req.num_prompt_tokens
            out.query_starts.append(len(token_ids))
            ranges.append((req, lo, hi))
            out.seq_lens.append(hi)
            if n == 1 and lo >= num_prompt:  # a decode, the common case: no slicing, no generator
                token_ids.append(req.output_token_ids[lo - num_prompt])
                slots.append(table[lo // block_size] * block_size + lo % block_size)
                if positions is not None:
                    positions.append(lo + req.mrope_delta)
                continue
            positions = None
            token_ids.extend(_token_ids(req, lo, hi))
            slots.extend(table[i // block_size] * block_size + i % block_size for i in range(lo, hi))
        out.decode_positions = positions
        if positions is None:  # not a pure decode: the M-RoPE layout is needed (eager step)
            out.positions = torch.cat([_positions(req, lo, hi) for req, lo, hi in ranges], dim=1)
        return out

    def positions_tensor(self) -> torch.Tensor:
        """[3, tokens] M-RoPE positions (read only by eager steps: a graph step needs none)."""
        if self.positions is not None:
            return self.positions
        return torch.tensor(self.decode_positions).expand(3, -1)  # decode: t = h = w


def _language_model(model: torch.nn.Module) -> Qwen2Model:
    """The decoder inside `model`, whose layer loop takes the `after_layer` hook."""
    found = [m for m in model.modules() if isinstance(m, Qwen2Model)]
    if len(found) != 1:
        raise ValueError(f"expected one language model in {type(model).__name__}, found {len(found)}")
    return found[0]


def _token_ids(req: Request, lo: int, hi: int) -> list[int]:
    """Tokens lo..hi-1 of the request, without concatenating its prompt and output lists."""
    prompt, num_prompt = req.prompt_token_ids, req.num_prompt_tokens
    if hi <= num_prompt:
        return prompt[lo:hi]
    if lo >= num_prompt:
        return req.output_token_ids[lo - num_prompt : hi - num_prompt]
    return prompt[lo:] + req.output_token_ids[: hi - num_prompt]


def _positions(req: Request, lo: int, hi: int) -> torch.Tensor:
    """M-RoPE positions of tokens lo..hi-1: from the prompt layout, then continuing by delta."""
    split = min(max(lo, req.num_prompt_tokens), hi)
    parts = []
    if lo < split:
        parts.append(req.prompt_positions[:, lo:split])
    if split < hi:
        parts.append(decode_positions(split, hi - split, req.mrope_delta))
    return torch.cat(parts, dim=1)
