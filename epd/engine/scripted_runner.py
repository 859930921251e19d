"""A model runner and a vision tower without a model, for tests of everything around them and for
the simulator (epd.sim), where they also spend virtual time.

Its "KV cache" holds one number per token slot: the token id, or for an image placeholder a
number drawn from that token's embedding row. The next token is a fixed function of every number
the request's slots hold, in order. The scripted vision tower makes each embedding row an exact
sample of the image's pixels. So outputs are deterministic and cost nothing, yet they change if
anything on the way is wrong: embeddings of the wrong image (or none) reaching a prefill, a hand-off
that moved the wrong KV rows, a prefix hit on the wrong image, a request that skipped a token.
`gather_kv` / `inject_kv` move those numbers in the real KV layout
([layers=1, 2, tokens, kv_heads=1, head_dim=1]), so the transfer code runs unchanged.

Given `ComputeCosts` (a cost model), every forward and every vision batch moves the instance's
virtual clock on by what the cost model says it takes: the simulator's compute.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from epd.clock import Clock, VirtualClock
from epd.config import EngineConfig, ModelConfig
from epd.engine.embedders import ImageEmbedder
from epd.engine.factory import ModelParts, choose_embedder
from epd.engine.mm_cache import MMCache
from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch
from epd.models.config import VLModelConfig

MODULUS = 1_000_003  # a prime: the running sum mixes every slot
Grid = tuple[int, int, int]


class ComputeCosts(Protocol):
    """How long compute takes, in seconds (a fitted cost model, or a simple linear one)."""

    def step_seconds(self, batch: ScheduledBatch) -> float:
        """One engine forward over `batch`."""
        ...

    def encode_seconds(self, grids: Sequence[Grid]) -> float:
        """One vision batch of images with these patch grids."""
        ...


@dataclass(frozen=True)
class VirtualCost:
    """Scripted compute that takes time: `costs` says how long, `clock` (the instance's) moves on."""

    clock: VirtualClock
    costs: ComputeCosts


class ScriptedRunner:
    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        vocab_size: int,
        merge_size: int,
        embedder: ImageEmbedder,
        cost: VirtualCost | None = None,
    ) -> None:
        self.block_size, self.vocab_size, self.merge_size = block_size, vocab_size, merge_size
        # One float64 per slot for K (the token's number) and V (its position): exact integers. In
        # numpy, with `kv_cache` a torch view of the same memory: the runner's own work is many tiny
        # operations, where torch's per-call overhead cost more than the rest of an engine step.
        self.kv = np.zeros((1, 2, num_blocks * block_size, 1, 1), dtype=np.float64)
        self.kv_cache = torch.from_numpy(self.kv)
        self.embedder, self.cost = embedder, cost
        self._in_block = np.arange(block_size)
        self._powers = np.ones(1, dtype=np.int64)  # 31 ** i mod MODULUS, grown on demand

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        return torch.from_numpy(self._slots(block_table, start, end))

    def _slots(self, block_table: list[int], start: int, end: int) -> np.ndarray:
        bs = self.block_size
        first = start // bs
        blocks = np.array(block_table[first : -(-end // bs)], dtype=np.int64)
        return (blocks[:, None] * bs + self._in_block).reshape(-1)[start - first * bs : end - first * bs]

    def gather_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        return torch.from_numpy(self.kv[:, :, self._slots(block_table, 0, num_tokens)])

    def gather_kv_layer(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return self.kv_cache[layer].index_select(1, slots)

    handoff_kv = gather_kv  # a hand-off's KV: the whole of it, as ModelRunner's
    handoff_kv_layer = gather_kv_layer

    def inject_kv(self, block_table: list[int], start: int, kv: torch.Tensor) -> None:
        end = kv.shape[2]
        self.kv[:, :, self._slots(block_table, start, end)] = kv[:, :, start:end].double().numpy()

    def run(
        self,
        batch: ScheduledBatch,
        block_tables: list[list[int]],
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits [len(batch), vocab]: each request's next token one-hot, after writing its new slots."""
        ends = batch.token_ends()
        self.embedder.ensure(batch.requests, ends)
        if self.cost is not None:
            # The forward's time passes before its results exist (and before any KV leaves).
            self.cost.clock.advance(self.cost.costs.step_seconds(batch))
        starts = [req.num_computed_tokens for req in batch.requests]
        ends = [start + n for start, n in zip(starts, batch.num_new_tokens)]
        flat = _FlatBatch(ends, starts)
        slots = np.concatenate([self._slots(table, 0, end) for table, end in zip(block_tables, ends)])
        written = slots[flat.is_new]
        numbers = [n for req, s, e in zip(batch.requests, starts, ends) for n in _numbers(req, s, e)]
        self.kv[0, 0, written, 0, 0] = numbers
        self.kv[0, 1, written, 0, 0] = flat.positions[flat.is_new]
        if after_layer is not None:
            after_layer(0)
        logits = torch.zeros(len(batch), self.vocab_size)
        logits[torch.arange(len(batch)), torch.from_numpy(self._next_tokens(slots, flat))] = 1.0
        return logits

    def _next_tokens(self, slots: np.ndarray, flat: _FlatBatch) -> np.ndarray:
        """Per request, over every slot it holds in order: mixed = (mixed * 31 + number * (position
        + 1)) mod MODULUS; computed as the sum of each term times 31 ** (slots after it)."""
        kv = self.kv[0, :, slots, 0, 0].astype(np.int64)  # [slots, 2]
        terms = kv[:, 0] * (kv[:, 1] + 1) % MODULUS
        after = flat.lengths[flat.request] - 1 - flat.positions
        weighted = terms * self._powers_of_31(len(slots))[after] % MODULUS  # < 2**40: sums fit int64
        mixed = np.add.reduceat(weighted, flat.first)  # every request holds at least one slot
        return mixed % MODULUS % self.vocab_size

    def _powers_of_31(self, count: int) -> np.ndarray:
        if len(self._powers) < count:
            powers = [1]
            for _ in range(max(count, 2 * len(self._powers)) - 1):
                powers.append(powers[-1] * 31 % MODULUS)
            self._powers = np.array(powers, dtype=np.int64)
        return self._powers


class _FlatBatch:
    """Request i's positions 0 .. ends[i] - 1, laid end to end: which request and position each
    entry is, and whether the step computes it (from starts[i] on)."""

    def __init__(self, ends: list[int], starts: list[int]) -> None:
        self.lengths = np.array(ends, dtype=np.int64)
        self.request = np.repeat(np.arange(len(ends)), self.lengths)
        self.first = np.cumsum(self.lengths) - self.lengths
        self.positions = np.arange(int(self.lengths.sum())) - self.first[self.request]
        self.is_new = self.positions >= np.array(starts, dtype=np.int64)[self.request]


def _numbers(req: Request, start: int, end: int) -> list[int]:
    """The number each token from `start` to `end` stands for: its id, or its embedding row's."""
    numbers = list(req.all_token_ids[start:end])
    for span, embeds in zip(req.prompt.placeholders, req.image_embeds):
        first, last = max(start, span.offset), min(end, span.end)
        if first < last:
            rows = _row_numbers(embeds[first - span.offset : last - span.offset])
            numbers[first - start : last - start] = rows
    return numbers


def _row_numbers(rows: torch.Tensor) -> list[int]:
    """One number per embedding row, from its exact bytes (any dtype)."""
    data = rows.detach().cpu().contiguous().view(torch.uint8).numpy()
    return [
        int.from_bytes(hashlib.blake2b(row.tobytes(), digest_size=8).digest(), "little") % MODULUS
        for row in data
    ]


class ScriptedVision(torch.nn.Module):
    """A vision tower without weights: each image token's embedding row is a fixed sample of its
    merge group's pixels. A copy, no arithmetic, so the same pixels give the same bytes on every
    instance, whichever encodes them. No parameters: an instance reports 0 vision weights."""

    def __init__(self, config: VLModelConfig, dtype: torch.dtype, cost: VirtualCost | None = None) -> None:
        super().__init__()
        self.config, self.dtype, self.cost = config, dtype, cost
        self.hidden = config.mm_embed_width
        self.merge = config.vision.spatial_merge_size**2

    def encode_images(self, pixel_values: torch.Tensor, grids: Sequence[Grid]) -> list[torch.Tensor]:
        """Packed patches of several images -> one [tokens_i, out_hidden] tensor per image."""
        if self.cost is not None:
            self.cost.clock.advance(self.cost.costs.encode_seconds(grids))
        sizes = [t * h * w for t, h, w in grids]
        return [self._embed(patches) for patches in pixel_values.split(sizes)]

    def _embed(self, patches: torch.Tensor) -> torch.Tensor:
        groups = patches.reshape(patches.shape[0] // self.merge, -1)  # merge groups are contiguous
        width = groups.shape[1]
        columns = (torch.arange(self.hidden) * max(1, width // self.hidden)) % width
        return groups[:, columns].to(self.dtype)


def scripted_vision(
    model: ModelConfig, device: torch.device, clock: Clock, costs: ComputeCosts | None = None
) -> ScriptedVision:
    """A `VisionFactory` (epd.cluster.instance.encode_stage): the scripted tower, nothing loaded."""
    return ScriptedVision(model.hf, model.torch_dtype, virtual_cost(clock, costs)).to(device)


def scripted_parts(
    config: EngineConfig,
    *,
    encode_locally: bool,
    mm_cache: MMCache | None,
    clock: Clock,
    instance: str | None,
    costs: ComputeCosts | None = None,
) -> ModelParts:
    """A `PartsFactory` (epd.engine.factory): the scripted runner, sized by the config's KV blocks,
    taking embeddings where a real engine would (the scripted tower here, the MM cache, or none)."""
    cc, model = config.cache, config.model
    device = torch.device(config.device)
    vision = scripted_vision(model, device, clock, costs) if encode_locally else None
    embedder = choose_embedder(vision, mm_cache, device, clock, instance)
    num_blocks = cc.num_kv_blocks or 4096
    merge_size = model.hf.vision.spatial_merge_size
    cost = virtual_cost(clock, costs)
    runner = ScriptedRunner(num_blocks, cc.block_size, model.hf.text.vocab_size, merge_size, embedder, cost)
    return ModelParts(runner, num_blocks)


def virtual_cost(clock: Clock, costs: ComputeCosts | None) -> VirtualCost | None:
    """Costs are spent on the instance's clock, which must then be virtual (wall time cannot be moved)."""
    if costs is None:
        return None
    if not isinstance(clock, VirtualClock):
        raise TypeError(f"scripted compute with costs needs a VirtualClock, not {type(clock).__name__}")
    return VirtualCost(clock, costs)
