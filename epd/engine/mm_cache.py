"""Paged buffer of encoder outputs (image embeddings) keyed by image content hash, on E and P instances.

Style note: E and P call this once per image per step; every operation is O(blocks of the entry
touched) in Python plus one gather/scatter kernel. Keep it that way: no scans over the pool, no
per-row Python loops.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import torch


@dataclass(slots=True, eq=False)
class _Entry:
    """One image's embeddings: which blocks hold it, which flat rows, and who holds it."""

    num_tokens: int
    blocks: list[int]
    rows: torch.Tensor  # [num_tokens] long, on the buffer's device: row ids in the flat buffer view
    ref_count: int = 1
    complete: bool = False


class MMCache:
    """Image embeddings ([num_tokens, hidden] each) stored in fixed-size blocks of one preallocated tensor.

    The same object is the transfer buffer (an E instance keeps an entry pinned until P has pulled it,
    so a full cache pushes back on admission) and the encoder-output cache (an image whose hash is
    already here is not encoded or pulled again). Not thread-safe: one instance loop owns it.

    Entry states (every key is in exactly one) and the calls that move it:

    | state      | complete | ref_count | readable (`in`, get) | evictable | kept in            |
    |------------|----------|-----------|----------------------|-----------|--------------------|
    | absent     | -        | -         | no                   | -         | nowhere            |
    | pending    | no       | >= 1      | no                   | no        | `_entries`         |
    | pinned     | yes      | >= 1      | yes                  | no        | `_entries`         |
    | cached     | yes      | 0         | yes                  | yes (LRU) | `_entries`, `_lru` |

    - absent  --reserve-->           pending (ref 1: the producer's pin)
    - absent  --put-->               pinned (ref 1) when it fits; else nothing changes (False)
    - pending --write-->             pinned (ref unchanged)
    - pending --pin / unpin-->       pending (ref +-1; a waiter for the same image; unpin to 0 is an
                                     error: a reservation nobody holds would never be written)
    - pending --drop (ref <= 1)-->   absent (the producer gives up, e.g. a failed encode)
    - pinned  --pin / put-->         pinned (ref + 1; put copies nothing)
    - pinned  --unpin-->             pinned (ref - 1), or cached when ref reaches 0 (MRU end of `_lru`)
    - cached  --pin / put-->         pinned (ref 1)
    - cached  --get / lookup hit-->  cached, moved to the MRU end
    - cached  --evicted-->           absent (by reserve/put needing room, LRU first)
    - pinned  --drop (ref <= 1)-->   absent; drop of a cached entry is always allowed
    - any     --clear-->             absent

    Invariants:
    - Every block is either in `_free` or in exactly one entry's `blocks`; so
      `free_blocks + used_blocks == num_blocks`.
    - An entry of n rows owns exactly ceil(n / block_size) blocks; row i lives at
      `buffer[blocks[i // block_size], i % block_size]`.
    - `_lru` holds exactly the complete entries with ref_count 0, least recently used first, and
      `_evictable_blocks` is the sum of their block counts.
    - Pinned and pending entries are never evicted; a reserve that cannot fit changes nothing.

    Counters (cumulative, never reset, so they can back Prometheus counters): `hits` / `misses`
    count `lookup` answers only, the admission-time question "must I encode/pull this image?".
    `get` does not count: it reads an entry the caller already knows is there, and counting it too
    would count every reuse twice. `stores` counts entries written, `evictions` entries evicted.
    """

    def __init__(
        self,
        num_blocks: int,
        block_size: int,
        hidden_size: int,
        dtype: torch.dtype = torch.float32,
        device: str | torch.device = "cpu",
    ) -> None:
        if num_blocks <= 0 or block_size <= 0 or hidden_size <= 0:
            raise ValueError(
                f"num_blocks, block_size and hidden_size must be positive, "
                f"got {num_blocks}, {block_size}, {hidden_size}"
            )
        self.block_size = block_size
        self.hidden_size = hidden_size
        self.dtype = dtype
        self.device = torch.device(device)
        self._buffer = torch.zeros(num_blocks, block_size, hidden_size, dtype=dtype, device=self.device)
        # Rows of all blocks in one 2-D view: an entry's rows are scattered/gathered with one kernel.
        self._flat = self._buffer.view(num_blocks * block_size, hidden_size)
        self._row_in_block = torch.arange(block_size, device=self.device)
        self._free: list[int] = list(range(num_blocks - 1, -1, -1))  # a stack: block 0 is handed out first
        self._entries: dict[str, _Entry] = {}
        self._lru: OrderedDict[str, None] = OrderedDict()  # cached (complete, ref 0) entries, LRU first
        self._evictable_blocks = 0
        self.hits = 0
        self.misses = 0
        self.evictions = 0
        self.stores = 0
        # Told the key of every entry evicted: a prefill instance reports them to the router.
        self.on_evict: Callable[[str], None] | None = None

    @staticmethod
    def blocks_for_memory(memory_bytes: int, block_size: int, hidden_size: int, dtype: torch.dtype) -> int:
        """How many whole blocks of [block_size, hidden_size] `dtype` elements fit in `memory_bytes`."""
        if block_size <= 0 or hidden_size <= 0:
            raise ValueError(f"block_size and hidden_size must be positive, got {block_size}, {hidden_size}")
        return max(memory_bytes, 0) // (block_size * hidden_size * dtype.itemsize)

    # ---- pool state -------------------------------------------------------------------------
    @property
    def num_blocks(self) -> int:
        return self._buffer.shape[0]

    @property
    def free_blocks(self) -> int:
        """Blocks held by no entry."""
        return len(self._free)

    @property
    def used_blocks(self) -> int:
        """Blocks held by entries of any state, evictable cached ones included."""
        return self.num_blocks - len(self._free)

    @property
    def evictable_blocks(self) -> int:
        """Blocks of cached (complete, unpinned) entries: reclaimable by eviction."""
        return self._evictable_blocks

    @property
    def usage(self) -> float:
        """used_blocks / num_blocks, in [0, 1]."""
        return self.used_blocks / self.num_blocks

    def blocks_needed(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    # ---- queries ----------------------------------------------------------------------------
    def __contains__(self, key: str) -> bool:
        """True for complete entries only: a pending one is not readable yet."""
        entry = self._entries.get(key)
        return entry is not None and entry.complete

    def __len__(self) -> int:
        """Number of entries, pending ones included."""
        return len(self._entries)

    def is_pending(self, key: str) -> bool:
        """True while an entry is reserved but not written: someone is producing it right now."""
        entry = self._entries.get(key)
        return entry is not None and not entry.complete

    def lookup(self, key: str) -> bool:
        """Like `key in cache`, but counts a hit or a miss; a hit marks the entry recently used.

        A pending entry counts as a miss: its data is not here yet.
        """
        if key in self:
            self.hits += 1
            self._touch(key)
            return True
        self.misses += 1
        return False

    def get(self, key: str) -> torch.Tensor:
        """A contiguous [num_tokens, hidden] copy of a complete entry; marks it recently used.

        KeyError if the entry is absent or still pending. The copy stays valid after the entry is
        unpinned or evicted.
        """
        entry = self._complete_entry(key)
        self._touch(key)
        return self._flat.index_select(0, entry.rows)

    def num_tokens(self, key: str) -> int:
        """Rows of an entry, pending or complete; KeyError if absent."""
        return self._entry(key).num_tokens

    def ref_count(self, key: str) -> int:
        """Pins on an entry, pending or complete; KeyError if absent."""
        return self._entry(key).ref_count

    def can_fit(self, num_tokens: int) -> bool:
        """True when a reserve of `num_tokens` rows would succeed now (free plus evictable blocks)."""
        return self.blocks_needed(num_tokens) <= len(self._free) + self._evictable_blocks

    # ---- mutations --------------------------------------------------------------------------
    def reserve(self, key: str, num_tokens: int) -> bool:
        """Claim blocks for an entry about to be produced (encoded here or arriving from E).

        The entry is pending and pinned once (the producer's pin). Evicts least-recently-used cached
        entries if the free blocks are not enough. Returns False, changing nothing, when it cannot fit
        even after evicting every cached entry. ValueError if the key is already present or pending,
        or num_tokens < 1.
        """
        if key in self._entries:
            state = "complete" if self._entries[key].complete else "pending"
            raise ValueError(f"entry {key!r} is already {state}")
        if num_tokens < 1:
            raise ValueError(f"an entry needs at least one row, got num_tokens={num_tokens}")
        if not self.can_fit(num_tokens):
            return False
        needed = self.blocks_needed(num_tokens)
        while len(self._free) < needed:
            self._evict_lru()
        blocks = [self._free.pop() for _ in range(needed)]
        self._entries[key] = _Entry(num_tokens, blocks, self._rows_of(blocks, num_tokens))
        return True

    def write(self, key: str, embeds: torch.Tensor) -> None:
        """Fill a pending entry; it becomes complete (and stays pinned by its producer).

        KeyError if absent; ValueError if already complete, or if `embeds` is not
        [num_tokens, hidden_size] of the cache's dtype (a silent cast would hide a dtype mismatch
        between encoder and cache, and the layouts must give bit-identical outputs).
        """
        entry = self._entry(key)
        if entry.complete:
            raise ValueError(f"entry {key!r} is already written")
        self._check_embeds(embeds, entry.num_tokens)
        self._flat.index_copy_(0, entry.rows, embeds.to(self.device))
        entry.complete = True
        self.stores += 1

    def put(self, key: str, embeds: torch.Tensor) -> bool:
        """Store and pin `embeds` under `key` (reserve + write); False, changing nothing, if no room.

        If the key is already complete, nothing is copied: the entry is pinned once more and True is
        returned. ValueError if the key is pending (someone else is producing it: pin and wait instead).
        """
        entry = self._entries.get(key)
        if entry is not None and entry.complete:
            self.pin(key)
            return True
        if embeds.dim() != 2:
            raise ValueError(f"embeds must be [num_tokens, hidden], got shape {tuple(embeds.shape)}")
        self._check_embeds(embeds, embeds.shape[0])  # before reserving, so a bad tensor changes nothing
        if not self.reserve(key, embeds.shape[0]):
            return False
        self.write(key, embeds)
        return True

    def pin(self, key: str) -> None:
        """Add a reference: the entry (pending or complete) will not be evicted. KeyError if absent."""
        entry = self._entry(key)
        if entry.ref_count == 0:
            del self._lru[key]
            self._evictable_blocks -= len(entry.blocks)
        entry.ref_count += 1

    def unpin(self, key: str) -> None:
        """Drop a reference. At 0 a complete entry stays cached (evictable, most recently used).

        ValueError if the entry is not pinned, or if this would leave a pending entry unpinned
        (use `drop` to abandon a reservation). KeyError if absent.
        """
        entry = self._entry(key)
        if entry.ref_count == 0:
            raise ValueError(f"entry {key!r} is not pinned")
        if not entry.complete and entry.ref_count == 1:
            raise ValueError(f"entry {key!r} is pending: drop it to abandon the reservation")
        entry.ref_count -= 1
        if entry.ref_count == 0:
            self._lru[key] = None
            self._evictable_blocks += len(entry.blocks)

    def drop(self, key: str) -> None:
        """Remove an entry now and free its blocks (e.g. the reservation of a failed encode).

        Allowed while at most one pin is held: the caller's own (the producer's reservation, or the
        last reader's). ValueError if others still pin it: they are waiting for or reading this entry
        and must be told and unpin first. KeyError if absent.
        """
        entry = self._entry(key)
        if entry.ref_count > 1:
            raise ValueError(f"entry {key!r} is pinned {entry.ref_count} times; unpin the others first")
        self._remove(key)

    def clear(self) -> None:
        """Remove every entry, pinned or not (the instance is drained, e.g. before a role switch).

        Counters are kept: they are cumulative.
        """
        self._entries.clear()
        self._lru.clear()
        self._evictable_blocks = 0
        self._free = list(range(self.num_blocks - 1, -1, -1))

    # ---- internals --------------------------------------------------------------------------
    def _entry(self, key: str) -> _Entry:
        entry = self._entries.get(key)
        if entry is None:
            raise KeyError(key)
        return entry

    def _complete_entry(self, key: str) -> _Entry:
        entry = self._entry(key)
        if not entry.complete:
            raise KeyError(f"entry {key!r} is pending: not written yet")
        return entry

    def _touch(self, key: str) -> None:
        if key in self._lru:
            self._lru.move_to_end(key)

    def _rows_of(self, blocks: list[int], num_tokens: int) -> torch.Tensor:
        """Flat row ids of an entry's first num_tokens rows, in order."""
        block_ids = torch.tensor(blocks, dtype=torch.long, device=self.device)
        rows = block_ids[:, None] * self.block_size + self._row_in_block[None, :]
        return rows.reshape(-1)[:num_tokens].contiguous()

    def _check_embeds(self, embeds: torch.Tensor, num_tokens: int) -> None:
        if tuple(embeds.shape) != (num_tokens, self.hidden_size):
            raise ValueError(f"embeds must be [{num_tokens}, {self.hidden_size}], got {list(embeds.shape)}")
        if embeds.dtype != self.dtype:
            raise ValueError(f"embeds dtype {embeds.dtype} differs from the cache's {self.dtype}")

    def _evict_lru(self) -> None:
        key = next(iter(self._lru))
        self._remove(key)
        self.evictions += 1
        if self.on_evict is not None:
            self.on_evict(key)

    def _remove(self, key: str) -> None:
        entry = self._entries.pop(key)
        if entry.ref_count == 0:
            del self._lru[key]
            self._evictable_blocks -= len(entry.blocks)
        self._free.extend(entry.blocks)
