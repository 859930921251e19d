"""Paged KV-cache bookkeeping: block ids, reference counts and the prefix-cache hash chain.

Style note: this runs once per request per step on the scheduler's hot path. Every operation is
O(blocks touched); keep it that way (dicts, deques, OrderedDict; no scans over the whole pool).
The KV tensor itself lives in the model runner; this module only says which block ids a request owns.
"""

from __future__ import annotations

import hashlib
import pickle
from collections import OrderedDict, deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

# (offset, length, content_hash) of one image's placeholder tokens in the prompt.
MMSpan = tuple[int, int, str]
BlockKey = bytes | str | int
HashFn = Callable[[tuple], BlockKey]
ExtraKeys = tuple[tuple[str, int], ...]  # per block: (image content_hash, image offset - block start)


def sha256_hash(item: tuple) -> bytes:
    """Default block hash: sha256 of a pickle of ints, strs, bytes, None and tuples.

    Pickle of those types is byte-stable across processes and runs (unlike Python's salted
    `hash()` of str), so P and D instances agree on keys.
    """
    return hashlib.sha256(pickle.dumps(item, protocol=4)).digest()


def block_extra_keys(mm_spans: Sequence[MMSpan], num_blocks: int, block_size: int) -> list[ExtraKeys]:
    """For each of the first `num_blocks` blocks, the images overlapping it, in prompt order.

    Each image is keyed by (content_hash, offset - block start): the hash so identical placeholder
    tokens of different images never match; the relative offset because text can contain literal
    placeholder tokens, so equal tokens alone do not prove the image sits at the same place.
    """
    extras: list[list[tuple[str, int]]] = [[] for _ in range(num_blocks)]
    for offset, length, content_hash in sorted(mm_spans, key=lambda s: s[0]):
        if length <= 0:
            continue
        first, last = offset // block_size, (offset + length - 1) // block_size
        for i in range(first, min(last + 1, num_blocks)):
            extras[i].append((content_hash, offset - i * block_size))
    return [tuple(e) for e in extras]


@dataclass(slots=True)
class _Block:
    """One KV block's bookkeeping. `serial` names this incarnation of the block's content."""

    block_id: int
    ref_count: int = 0
    serial: int = -1
    key: BlockKey | None = None  # set while registered in the prefix table
    tokens: tuple[int, ...] = ()
    extra_keys: ExtraKeys = ()
    parent_serial: int | None = None  # serial of the block holding the previous tokens; None for block 0


@dataclass(slots=True)
class _Request:
    table: list[int] = field(default_factory=list)
    num_cached_tokens: int = 0
    # Hash chain of the request's committed full blocks: key of block i and the serial of the
    # canonical (registered, content-equal) block holding block i's KV.
    keys: list[BlockKey] = field(default_factory=list)
    serials: list[int] = field(default_factory=list)


class BlockManager:
    """Hands out KV blocks of `block_size` tokens and reuses full blocks across requests by prefix.

    Block i of a request holds tokens [i * block_size, (i + 1) * block_size).

    Block states (every block is in exactly one):

    | state        | ref_count | registered in prefix table | kept in            | allocatable |
    |--------------|-----------|----------------------------|--------------------|-------------|
    | free-unhashed| 0         | no                         | `_free_unhashed`   | yes, first  |
    | free-cached  | 0         | yes (reusable by lookup)   | `_evictable` (LRU) | yes, evicts |
    | in use       | >= 1      | maybe                      | request tables     | no          |

    Invariants:
    - ref_count of a block == number of request tables that hold it (a table holds a block at most once).
    - `num_free_blocks == len(_free_unhashed) + len(_evictable)`; the rest are in use.
    - `_blocks[_hash_to_block[k]].key == k`: at most one block per key; only full, computed blocks
      are registered.
    - A block shared by several tables is full and computed: nobody writes into it again
      (allocate_prompt reuses full blocks only and always leaves >= 1 token to compute).
    - Taking a free-cached block for new data unregisters its old key first (eviction).
    - Freed blocks enter `_evictable` tail-first, so a request's last blocks are evicted before its
      first ones (prefix heads are the blocks most likely to be shared).

    Hits are exact even under hash collisions: a hit needs equal key, equal block tokens, equal image
    keys and the stored parent serial equal to the serial matched for the previous block. Every
    allocation gives a block a fresh serial, so a chain of matches means an equal whole prefix.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        enable_prefix_caching: bool = True,
        hash_fn: HashFn | None = None,
    ) -> None:
        if num_blocks <= 0 or block_size <= 0:
            raise ValueError(f"num_blocks and block_size must be positive, got {num_blocks}, {block_size}")
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.hash_fn: HashFn = hash_fn or sha256_hash
        self._blocks = [_Block(i) for i in range(num_blocks)]
        self._free_unhashed: deque[int] = deque(range(num_blocks))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest-freed first
        self._hash_to_block: dict[BlockKey, int] = {}
        self._requests: dict[str, _Request] = {}
        self._next_serial = 0
        self.prefix_query_tokens = 0
        self.prefix_hit_tokens = 0

    # ---- pool state -------------------------------------------------------------------------
    @property
    def num_free_blocks(self) -> int:
        """Blocks that can be handed out now: never used or cached-but-unreferenced (evictable)."""
        return len(self._free_unhashed) + len(self._evictable)

    @property
    def usage(self) -> float:
        """Share of blocks referenced by live requests, in [0, 1]."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    @property
    def num_cached_blocks(self) -> int:
        """Blocks registered for prefix reuse (in use or evictable)."""
        return len(self._hash_to_block)

    @property
    def hit_rate(self) -> float:
        """prefix_hit_tokens / prefix_query_tokens (0.0 before any query).

        Both count successful allocate_prompt calls only (a refused one changes nothing).
        """
        return self.prefix_hit_tokens / self.prefix_query_tokens if self.prefix_query_tokens else 0.0

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def has(self, request_id: str) -> bool:
        return request_id in self._requests

    def block_table(self, request_id: str) -> list[int]:
        """The request's block ids in token order (a copy). KeyError if it holds no blocks."""
        return list(self._requests[request_id].table)

    def num_cached_tokens(self, request_id: str) -> int:
        """Prompt tokens the request got from the prefix cache at allocate_prompt."""
        return self._requests[request_id].num_cached_tokens

    def ref_count(self, block_id: int) -> int:
        return self._blocks[block_id].ref_count

    # ---- request lifecycle ------------------------------------------------------------------
    def cached_prefix_tokens(self, token_ids: Sequence[int], mm_spans: Sequence[MMSpan] = ()) -> int:
        """The prompt tokens `allocate_prompt` would take from the prefix cache now (it may have
        changed by the time it runs), without taking anything."""
        if not self.enable_prefix_caching or not token_ids:
            return 0
        return len(self._lookup_prefix(token_ids, mm_spans)[0]) * self.block_size

    def allocate_prompt(
        self, request_id: str, token_ids: Sequence[int], mm_spans: Sequence[MMSpan] = ()
    ) -> int | None:
        """Give `request_id` blocks covering all its prompt tokens, reusing cached prefix blocks.

        Returns the number of cached tokens: a multiple of block_size and always < len(token_ids),
        so at least one token is computed (for logits) and no shared block is written to.
        Returns None, with no state change, if the pool cannot cover the rest.
        ValueError if the request already holds blocks or the prompt is empty.
        """
        if request_id in self._requests:
            raise ValueError(f"request {request_id!r} already holds blocks")
        num_tokens = len(token_ids)
        if num_tokens == 0:
            raise ValueError("cannot allocate an empty prompt")
        hits, keys = self._lookup_prefix(token_ids, mm_spans) if self.enable_prefix_caching else ([], [])
        num_new = self.blocks_needed(num_tokens) - len(hits)
        # Free-cached hits leave the free pool when we take them, so they don't count as room.
        revived = sum(1 for b in hits if self._blocks[b].ref_count == 0)
        if num_new > self.num_free_blocks - revived:
            return None
        for block_id in hits:
            self._ref(block_id)
        req = _Request(num_cached_tokens=len(hits) * self.block_size)
        req.table = hits + [self._take_free_block() for _ in range(num_new)]
        req.keys = keys
        req.serials = [self._blocks[b].serial for b in hits]
        self._requests[request_id] = req
        self.prefix_query_tokens += num_tokens
        self.prefix_hit_tokens += req.num_cached_tokens
        return req.num_cached_tokens

    def append_slots(self, request_id: str, num_tokens: int) -> bool:
        """Grow the request's table to cover `num_tokens` tokens in total (never shrinks it).

        False, with no state change, if there are not enough free blocks. KeyError if unknown.
        """
        req = self._requests[request_id]
        num_new = self.blocks_needed(num_tokens) - len(req.table)
        if num_new <= 0:
            return True
        if num_new > self.num_free_blocks:
            return False
        req.table.extend(self._take_free_block() for _ in range(num_new))
        return True

    def commit(
        self, request_id: str, token_ids: Sequence[int], mm_spans: Sequence[MMSpan], num_computed_tokens: int
    ) -> None:
        """Record that the first `num_computed_tokens` of `token_ids` have their KV written.

        Registers the request's newly completed full blocks for prefix reuse. If a content-equal
        block is already registered (another request computed the same prefix concurrently), the
        existing registration is kept and this request's copy stays private.
        """
        req = self._requests[request_id]
        if not 0 <= num_computed_tokens <= min(len(token_ids), len(req.table) * self.block_size):
            raise ValueError(
                f"num_computed_tokens={num_computed_tokens} outside [0, min({len(token_ids)} tokens, "
                f"{len(req.table)} blocks * {self.block_size})]"
            )
        if not self.enable_prefix_caching:
            return
        num_full = num_computed_tokens // self.block_size
        start = len(req.keys)
        if num_full <= start:
            return
        extras = block_extra_keys(mm_spans, num_full, self.block_size)
        for i in range(start, num_full):
            parent_key = req.keys[i - 1] if i else None
            parent_serial = req.serials[i - 1] if i else None
            tokens = self._block_tokens(token_ids, i)
            key = self.hash_fn((parent_key, tokens, extras[i]))
            serial = self._register(req.table[i], key, tokens, extras[i], parent_serial)
            req.keys.append(key)
            req.serials.append(serial)

    def free(self, request_id: str) -> None:
        """Drop the request's references; a no-op for an id that holds no blocks.

        No-op (not an error) so the scheduler can free on abort or finish without first asking
        whether the request was ever admitted. Blocks reaching ref 0 return to the pool; registered
        ones stay reusable by lookup until evicted.
        """
        req = self._requests.pop(request_id, None)
        if req is None:
            return
        # Tail first: the request's last blocks become the least recently freed, evicted first.
        for block_id in reversed(req.table):
            self._unref(block_id)

    def reset_prefix_cache(self) -> bool:
        """Forget every registered block. Refused (False) while any block is in use."""
        if self.num_free_blocks != self.num_blocks:
            return False
        while self._evictable:
            block_id, _ = self._evictable.popitem(last=False)
            self._unregister(self._blocks[block_id])
            self._free_unhashed.append(block_id)
        return True

    # ---- internals --------------------------------------------------------------------------
    def _block_tokens(self, token_ids: Sequence[int], i: int) -> tuple[int, ...]:
        # int() so numpy / tensor scalars hash like plain ints.
        return tuple(map(int, token_ids[i * self.block_size : (i + 1) * self.block_size]))

    def _lookup_prefix(
        self, token_ids: Sequence[int], mm_spans: Sequence[MMSpan]
    ) -> tuple[list[int], list[BlockKey]]:
        """Cached blocks matching the prompt's full blocks from block 0 on, and their keys.

        Stops at the first miss, and before the block holding the last prompt token, so that
        at least one token is left to compute.
        """
        max_blocks = (len(token_ids) - 1) // self.block_size
        extras = block_extra_keys(mm_spans, max_blocks, self.block_size)
        hits: list[int] = []
        keys: list[BlockKey] = []
        parent_key: BlockKey | None = None
        parent_serial: int | None = None
        for i in range(max_blocks):
            tokens = self._block_tokens(token_ids, i)
            key = self.hash_fn((parent_key, tokens, extras[i]))
            block_id = self._hash_to_block.get(key)
            if block_id is None or not self._same_content(block_id, tokens, extras[i], parent_serial):
                break
            hits.append(block_id)
            keys.append(key)
            parent_key, parent_serial = key, self._blocks[block_id].serial
        return hits, keys

    def _same_content(
        self, block_id: int, tokens: tuple[int, ...], extra_keys: ExtraKeys, parent_serial: int | None
    ) -> bool:
        """Collision check: a key match counts only if the stored block really holds these tokens."""
        b = self._blocks[block_id]
        return b.tokens == tokens and b.extra_keys == extra_keys and b.parent_serial == parent_serial

    def _register(
        self,
        block_id: int,
        key: BlockKey,
        tokens: tuple[int, ...],
        extra_keys: ExtraKeys,
        parent_serial: int | None,
    ) -> int:
        """Register a computed full block under `key`; return the serial of the canonical block.

        The canonical block is this one, or an already registered content-equal one (duplicate).
        A colliding key with other content leaves this block private: its children still chain to
        its own serial, which no lookup can reach, so they never produce a wrong hit.
        """
        block = self._blocks[block_id]
        existing = self._hash_to_block.get(key)
        if existing is not None:
            same = self._same_content(existing, tokens, extra_keys, parent_serial)
            return self._blocks[existing].serial if same else block.serial
        block.key, block.tokens = key, tokens
        block.extra_keys, block.parent_serial = extra_keys, parent_serial
        self._hash_to_block[key] = block_id
        return block.serial

    def _unregister(self, block: _Block) -> None:
        if block.key is not None:
            del self._hash_to_block[block.key]
        block.key, block.tokens, block.extra_keys, block.parent_serial = None, (), (), None

    def _take_free_block(self) -> int:
        """A block for new data: never-used/unhashed first, else evict the least recently freed."""
        if self._free_unhashed:
            block_id = self._free_unhashed.popleft()
        else:
            block_id, _ = self._evictable.popitem(last=False)
        block = self._blocks[block_id]
        self._unregister(block)
        block.serial = self._next_serial
        self._next_serial += 1
        block.ref_count = 1
        return block_id

    def _ref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        if block.ref_count == 0:
            del self._evictable[block_id]
        block.ref_count += 1

    def _unref(self, block_id: int) -> None:
        block = self._blocks[block_id]
        block.ref_count -= 1
        if block.ref_count > 0:
            return
        if block.key is not None:
            self._evictable[block_id] = None
        else:
            self._free_unhashed.append(block_id)

    def check_invariants(self) -> None:
        """Assert the class invariants (O(num_blocks); for tests and debugging)."""
        holders: dict[int, int] = {}
        for req in self._requests.values():
            assert len(set(req.table)) == len(req.table), "a table holds a block twice"
            for block_id in req.table:
                holders[block_id] = holders.get(block_id, 0) + 1
        free = set(self._free_unhashed) | set(self._evictable)
        assert len(free) == len(self._free_unhashed) + len(self._evictable), "block in two free lists"
        for b in self._blocks:
            assert b.ref_count == holders.get(b.block_id, 0), f"block {b.block_id} ref_count mismatch"
            assert (b.ref_count == 0) == (b.block_id in free), f"block {b.block_id} free/in-use mismatch"
            if b.block_id in self._evictable:
                assert b.key is not None, f"evictable block {b.block_id} has no key"
            if b.block_id in self._free_unhashed:
                assert b.key is None, f"unhashed free block {b.block_id} has a key"
            if b.key is not None:
                assert self._hash_to_block[b.key] == b.block_id, f"block {b.block_id} key not in table"
        assert len(self._hash_to_block) == sum(b.key is not None for b in self._blocks)

    def __repr__(self) -> str:
        return (
            f"BlockManager(num_blocks={self.num_blocks}, block_size={self.block_size}, "
            f"free={self.num_free_blocks}, cached={len(self._hash_to_block)}, requests={len(self._requests)})"
        )


__all__ = ["BlockManager", "MMSpan", "block_extra_keys", "sha256_hash"]
