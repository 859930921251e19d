"""A model runner without a model, for tests of everything around it (and, later, the simulator).

Its "KV cache" holds one number per token slot: the token id, or for an image placeholder a
number drawn from the image's content hash and the position in it. The next token is a fixed
function of every number the request's slots hold, in order. So outputs are deterministic and
cost nothing, yet they change if any KV is wrong: a hand-off that moved the wrong rows, a prefix
hit on the wrong image, a request that skipped a token. `gather_kv` / `inject_kv` move those
numbers in the real KV layout ([layers=1, 2, tokens, kv_heads=1, head_dim=1]), so the transfer
code runs unchanged.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable

import torch

from epd.clock import Clock
from epd.config import EngineConfig
from epd.engine.embedders import ImageEmbedder
from epd.engine.factory import ModelParts
from epd.engine.mm_cache import MMCache
from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch

MODULUS = 1_000_003  # a prime: the running sum mixes every slot


class ScriptedRunner:
    def __init__(self, num_blocks: int, block_size: int, vocab_size: int, merge_size: int) -> None:
        self.block_size, self.vocab_size, self.merge_size = block_size, vocab_size, merge_size
        # One float64 per slot for K (the token's number) and V (its position): exact integers.
        self.kv_cache = torch.zeros(1, 2, num_blocks * block_size, 1, 1, dtype=torch.float64)
        self.embedder = ContentHashImages()

    def slots(self, block_table: list[int], start: int, end: int) -> torch.Tensor:
        bs = self.block_size
        return torch.tensor([block_table[i // bs] * bs + i % bs for i in range(start, end)], dtype=torch.long)

    def gather_kv(self, block_table: list[int], num_tokens: int) -> torch.Tensor:
        return self.kv_cache.index_select(2, self.slots(block_table, 0, num_tokens))

    def gather_kv_layer(self, layer: int, slots: torch.Tensor) -> torch.Tensor:
        return self.kv_cache[layer].index_select(1, slots)

    def inject_kv(self, block_table: list[int], start: int, kv: torch.Tensor) -> None:
        end = kv.shape[2]
        self.kv_cache.index_copy_(2, self.slots(block_table, start, end), kv[:, :, start:end].double())

    def run(
        self,
        batch: ScheduledBatch,
        block_tables: list[list[int]],
        after_layer: Callable[[int], None] | None = None,
    ) -> torch.Tensor:
        """Logits [len(batch), vocab]: each request's next token one-hot, after writing its new slots."""
        logits = torch.zeros(len(batch), self.vocab_size)
        for row, (req, n, table) in enumerate(zip(batch.requests, batch.num_new_tokens, block_tables)):
            start, end = req.num_computed_tokens, req.num_computed_tokens + n
            slots = self.slots(table, start, end)
            self.kv_cache[0, 0, slots, 0, 0] = torch.tensor(_numbers(req, start, end), dtype=torch.float64)
            self.kv_cache[0, 1, slots, 0, 0] = torch.arange(start, end, dtype=torch.float64)
            logits[row, self._next_token(table, end)] = 1.0
        if after_layer is not None:
            after_layer(0)
        return logits

    def _next_token(self, block_table: list[int], num_tokens: int) -> int:
        kv = self.kv_cache[0, :, self.slots(block_table, 0, num_tokens), 0, 0]
        numbers, positions = kv[0].long().tolist(), kv[1].long().tolist()
        mixed = 0
        for number, position in zip(numbers, positions):
            mixed = (mixed * 31 + number * (position + 1)) % MODULUS
        return mixed % self.vocab_size


class ContentHashImages(ImageEmbedder):
    """Images need no encoding here: their tokens' numbers come from the content hash."""

    def ensure(self, requests: list[Request]) -> None:
        pass

    def can_recompute(self, request: Request) -> bool:
        return True


def _numbers(req: Request, start: int, end: int) -> list[int]:
    """The number each token from `start` to `end` stands for: its id, or its image's content."""
    tokens = req.all_token_ids
    numbers = list(tokens[start:end])
    for span, image in zip(req.prompt.placeholders, req.prompt.images):
        for pos in range(max(start, span.offset), min(end, span.offset + span.length)):
            numbers[pos - start] = _image_number(image.content_hash, pos - span.offset)
    return numbers


def _image_number(content_hash: str, index: int) -> int:
    digest = hashlib.blake2b(f"{content_hash}:{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") % MODULUS


def scripted_parts(
    config: EngineConfig,
    *,
    encode_locally: bool,
    mm_cache: MMCache | None,
    clock: Clock,
    instance: str | None,
) -> ModelParts:
    """A `PartsFactory` (epd.engine.factory): the scripted runner, sized by the config's KV blocks."""
    cc, hf = config.cache, config.model.hf
    num_blocks = cc.num_kv_blocks or 4096
    runner = ScriptedRunner(num_blocks, cc.block_size, hf.text.vocab_size, hf.vision.spatial_merge_size)
    return ModelParts(runner, num_blocks)
