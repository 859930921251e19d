"""MMCache: paged storage round trips, block accounting, LRU eviction, pinning and pending entries."""

from __future__ import annotations

import random

import pytest
import torch

from epd.engine.mm_cache import MMCache

HIDDEN = 8
BLOCK = 4


def make_cache(num_blocks: int = 8, block_size: int = BLOCK, hidden: int = HIDDEN, **kw) -> MMCache:
    return MMCache(num_blocks, block_size, hidden, **kw)


def embeds(num_tokens: int, seed: int = 0, hidden: int = HIDDEN) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(num_tokens, hidden, generator=g)


def check_invariants(cache: MMCache) -> None:
    """Blocks are owned once; free + used == total; the LRU holds exactly the cached entries."""
    owned = [b for e in cache._entries.values() for b in e.blocks]
    assert len(owned) == len(set(owned)), "a block is shared between entries"
    assert not set(owned) & set(cache._free), "a block is both free and owned"
    assert len(owned) + cache.free_blocks == cache.num_blocks
    assert cache.free_blocks + cache.used_blocks == cache.num_blocks
    for e in cache._entries.values():
        assert len(e.blocks) == cache.blocks_needed(e.num_tokens)
    cached = {k for k, e in cache._entries.items() if e.complete and e.ref_count == 0}
    assert set(cache._lru) == cached
    assert cache.evictable_blocks == sum(len(cache._entries[k].blocks) for k in cached)
    assert all(e.ref_count >= 1 for e in cache._entries.values() if not e.complete)


# ---- storage ------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_tokens", [1, 3, BLOCK, 2 * BLOCK, 2 * BLOCK + 1, 8 * BLOCK])
def test_put_get_round_trip(num_tokens: int) -> None:
    cache = make_cache()
    x = embeds(num_tokens, seed=num_tokens)
    assert cache.put("img", x)
    out = cache.get("img")
    assert torch.equal(out, x)
    assert out.is_contiguous() and out.shape == (num_tokens, HIDDEN)
    assert cache.num_tokens("img") == num_tokens
    assert cache.used_blocks == -(-num_tokens // BLOCK)
    check_invariants(cache)


def test_round_trip_with_scattered_blocks_and_bf16() -> None:
    # Free a middle entry so the next one gets non-adjacent blocks.
    cache = make_cache(num_blocks=6, dtype=torch.bfloat16)
    xs = {k: embeds(n, seed=i).to(torch.bfloat16) for i, (k, n) in enumerate([("a", 4), ("b", 5), ("c", 4)])}
    for k, x in xs.items():
        assert cache.put(k, x)
    cache.unpin("b")
    cache.drop("b")
    y = embeds(9, seed=9).to(torch.bfloat16)
    assert cache.put("d", y)
    blocks = cache._entries["d"].blocks
    assert blocks != list(range(blocks[0], blocks[0] + len(blocks)))  # not one ascending run
    for k in ("a", "c"):
        assert torch.equal(cache.get(k), xs[k])
    assert torch.equal(cache.get("d"), y)
    check_invariants(cache)


def test_get_returns_a_copy() -> None:
    cache = make_cache()
    x = embeds(5)
    cache.put("a", x)
    cache.get("a").zero_()
    kept = cache.get("a")
    assert torch.equal(kept, x)
    cache.unpin("a")
    cache.drop("a")
    assert cache.put("b", embeds(32, seed=1))  # overwrites every block, a's included
    assert torch.equal(kept, x)


def test_block_accounting() -> None:
    cache = make_cache(num_blocks=8)
    assert (cache.free_blocks, cache.used_blocks, cache.usage) == (8, 0, 0.0)
    cache.put("a", embeds(5))  # 2 blocks
    cache.reserve("b", 4)  # 1 block, pending
    assert (cache.free_blocks, cache.used_blocks, cache.evictable_blocks) == (5, 3, 0)
    assert cache.usage == pytest.approx(3 / 8)
    cache.unpin("a")  # cached: still used, now evictable
    assert (cache.free_blocks, cache.used_blocks, cache.evictable_blocks) == (5, 3, 2)
    assert cache.can_fit(7 * BLOCK) and not cache.can_fit(7 * BLOCK + 1)
    cache.drop("b")
    cache.drop("a")
    assert (cache.free_blocks, cache.used_blocks, len(cache)) == (8, 0, 0)
    check_invariants(cache)


def test_blocks_for_memory() -> None:
    per_block = BLOCK * HIDDEN * 4
    assert MMCache.blocks_for_memory(10 * per_block + 3, BLOCK, HIDDEN, torch.float32) == 10
    assert MMCache.blocks_for_memory(10 * per_block, BLOCK, HIDDEN, torch.bfloat16) == 20
    assert MMCache.blocks_for_memory(per_block - 1, BLOCK, HIDDEN, torch.float32) == 0


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="positive"):
        MMCache(0, BLOCK, HIDDEN)
    cache = make_cache()
    with pytest.raises(ValueError, match=r"\[3, 8\]"):
        cache.put("a", torch.zeros(3, HIDDEN + 1))
    with pytest.raises(ValueError, match="dtype"):
        cache.put("a", torch.zeros(3, HIDDEN, dtype=torch.float64))
    with pytest.raises(ValueError, match="num_tokens"):
        cache.put("a", torch.zeros(HIDDEN))
    with pytest.raises(ValueError, match="at least one row"):
        cache.reserve("a", 0)
    assert len(cache) == 0 and cache.free_blocks == cache.num_blocks
    cache.reserve("a", 3)
    with pytest.raises(ValueError, match=r"\[3, 8\]"):
        cache.write("a", torch.zeros(4, HIDDEN))
    assert cache.is_pending("a")


# ---- eviction and pinning -----------------------------------------------------------------------
def test_lru_eviction_order() -> None:
    cache = make_cache(num_blocks=4)
    for i, k in enumerate("abcd"):
        cache.put(k, embeds(BLOCK, seed=i))
        cache.unpin(k)
    cache.get("a")  # a becomes most recently used; b is now the oldest
    assert cache.lookup("c")  # so does c
    assert cache.put("e", embeds(2 * BLOCK))  # needs two blocks: evicts b, then d
    assert [k for k in "abcde" if k in cache] == ["a", "c", "e"]
    assert cache.evictions == 2
    assert cache.put("f", embeds(BLOCK))  # a is the oldest cached now
    assert [k for k in "acef" if k in cache] == ["c", "e", "f"]
    check_invariants(cache)


def test_pinned_entries_are_never_evicted() -> None:
    cache = make_cache(num_blocks=4)
    cache.put("pinned", embeds(BLOCK, seed=1))
    cache.put("cached", embeds(BLOCK, seed=2))
    cache.unpin("cached")
    cache.put("repinned", embeds(BLOCK, seed=3))
    cache.unpin("repinned")
    cache.pin("repinned")  # back out of the LRU
    assert cache.put("new", embeds(2 * BLOCK))  # 1 free + 1 evictable
    assert "pinned" in cache and "repinned" in cache and "cached" not in cache
    assert torch.equal(cache.get("pinned"), embeds(BLOCK, seed=1))
    check_invariants(cache)


def test_reserve_fails_cleanly_when_only_pinned_entries_remain() -> None:
    cache = make_cache(num_blocks=4)
    cache.put("a", embeds(2 * BLOCK))
    cache.reserve("b", BLOCK)
    cache.put("c", embeds(BLOCK))
    cache.unpin("c")
    before = (cache.free_blocks, dict(cache._lru), {k: list(e.blocks) for k, e in cache._entries.items()})
    assert not cache.can_fit(2 * BLOCK + 1)
    assert not cache.reserve("d", 2 * BLOCK + 1)  # 1 evictable block is not enough for 3
    assert not cache.put("d", embeds(2 * BLOCK + 1))
    after = (cache.free_blocks, dict(cache._lru), {k: list(e.blocks) for k, e in cache._entries.items()})
    assert before == after and "c" in cache and cache.evictions == 0
    assert cache.reserve("d", BLOCK)  # a fitting one still evicts c
    assert "c" not in cache and cache.evictions == 1
    check_invariants(cache)


def test_pin_unpin_reference_counts() -> None:
    cache = make_cache()
    cache.put("a", embeds(3))
    cache.pin("a")
    assert cache.ref_count("a") == 2
    cache.unpin("a")
    cache.unpin("a")
    assert cache.ref_count("a") == 0 and "a" in cache and cache.evictable_blocks == 1
    with pytest.raises(ValueError, match="not pinned"):
        cache.unpin("a")
    with pytest.raises(KeyError):
        cache.pin("missing")


# ---- pending entries ----------------------------------------------------------------------------
def test_pending_entries_are_not_readable_until_written() -> None:
    cache = make_cache()
    assert cache.reserve("a", 6)
    assert "a" not in cache and cache.is_pending("a")
    assert not cache.lookup("a") and cache.misses == 1
    with pytest.raises(KeyError, match="pending"):
        cache.get("a")
    assert cache.num_tokens("a") == 6
    with pytest.raises(ValueError, match="pending"):
        cache.reserve("a", 6)
    with pytest.raises(ValueError, match="pending"):
        cache.put("a", embeds(6))
    x = embeds(6, seed=5)
    cache.write("a", x)
    assert "a" in cache and not cache.is_pending("a") and cache.ref_count("a") == 1
    assert torch.equal(cache.get("a"), x) and cache.stores == 1
    with pytest.raises(ValueError, match="already written"):
        cache.write("a", x)
    with pytest.raises(ValueError, match="already complete"):
        cache.reserve("a", 6)


def test_waiters_on_a_pending_entry_and_dropping_a_failed_reservation() -> None:
    cache = make_cache()
    cache.reserve("a", 5)
    cache.pin("a")  # a second request for the same image waits instead of encoding it again
    with pytest.raises(ValueError, match="unpin the others"):
        cache.drop("a")
    cache.unpin("a")  # the waiter gives up
    with pytest.raises(ValueError, match="drop it"):
        cache.unpin("a")  # the producer's pin cannot be released without writing or dropping
    cache.drop("a")  # the encode failed
    assert not cache.is_pending("a") and cache.free_blocks == cache.num_blocks
    with pytest.raises(KeyError):
        cache.drop("a")
    check_invariants(cache)


def test_reput_of_complete_key_pins_without_copying() -> None:
    cache = make_cache()
    x = embeds(5, seed=1)
    assert cache.put("a", x)
    used = cache.used_blocks
    assert cache.put("a", embeds(5, seed=2))
    assert cache.put("a", torch.zeros(1))  # not even looked at: nothing is copied
    assert cache.ref_count("a") == 3 and cache.stores == 1 and cache.used_blocks == used
    assert torch.equal(cache.get("a"), x)


def test_hit_miss_counters() -> None:
    cache = make_cache()
    assert not cache.lookup("a")
    cache.put("a", embeds(2))
    assert cache.lookup("a") and cache.lookup("a")
    assert not cache.lookup("b")
    cache.get("a")  # a read, not a lookup: not counted
    assert (cache.hits, cache.misses, cache.stores, cache.evictions) == (2, 2, 1, 0)


def test_clear_keeps_counters() -> None:
    cache = make_cache()
    cache.put("a", embeds(5))
    cache.reserve("b", 3)
    cache.lookup("a")
    cache.clear()
    assert len(cache) == 0 and cache.free_blocks == cache.num_blocks and "a" not in cache
    assert cache.hits == 1 and cache.stores == 1
    assert cache.put("a", embeds(32))
    check_invariants(cache)


# ---- randomized model check ---------------------------------------------------------------------
def test_random_operations_against_a_dict_model() -> None:
    """Random churn; a plain dict of tensors and ref counts is the reference model."""
    rng = random.Random(1234)
    cache = make_cache(num_blocks=12, block_size=3, hidden=5)
    data: dict[str, torch.Tensor] = {}  # complete entries the model expects (or that may be evicted)
    refs: dict[str, int] = {}  # model ref counts of entries present in the cache
    pending: dict[str, torch.Tensor] = {}
    keys = [f"k{i}" for i in range(10)]
    for step in range(1500):
        key, op = rng.choice(keys), rng.random()
        present = key in cache or cache.is_pending(key)
        if not present:  # a ref-0 entry may have been evicted by the cache: forget it
            refs.pop(key, None)
            data.pop(key, None)
        if op < 0.35 and not cache.is_pending(key):
            x = torch.randn(rng.randint(1, 10), 5)
            fits = key in cache or cache.can_fit(x.shape[0])
            assert cache.put(key, x) == fits
            if fits:
                data.setdefault(key, x)
                refs[key] = refs.get(key, 0) + 1
        elif op < 0.45 and not present:
            n = rng.randint(1, 10)
            fits = cache.can_fit(n)
            assert cache.reserve(key, n) == fits
            if fits:
                pending[key], refs[key] = torch.randn(n, 5), 1
        elif op < 0.55 and key in pending:
            cache.write(key, pending[key])
            data[key] = pending.pop(key)
        elif op < 0.65 and present and refs[key] <= 1:
            cache.drop(key)
            del refs[key]
            pending.pop(key, None)
            data.pop(key, None)
        elif op < 0.85 and refs.get(key, 0) > (1 if key in pending else 0):
            cache.unpin(key)
            refs[key] -= 1
        elif op < 0.9 and present:
            cache.pin(key)
            refs[key] += 1
        elif key in cache:
            assert torch.equal(cache.get(key), data[key])
        check_invariants(cache)
        for k, r in refs.items():  # pinned and pending entries are never evicted
            if r > 0:
                assert cache.ref_count(k) == r
                assert (k in cache) if k in data else cache.is_pending(k), (step, k)
        for k, x in data.items():  # whatever survives is intact
            if k in cache:
                assert torch.equal(cache.get(k), x), (step, k)
    assert cache.evictions > 0 and cache.stores > 0  # the churn did exercise eviction
