"""BlockManager: allocation, prefix caching by hash chain (with image keys), eviction, invariants."""

from __future__ import annotations

import os
import random
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from epd.engine.block_manager import BlockManager, MMSpan, sha256_hash

BS = 4


def make_bm(num_blocks: int = 16, **kwargs) -> BlockManager:
    return BlockManager(num_blocks=num_blocks, block_size=BS, **kwargs)


def toks(n: int, start: int = 0) -> list[int]:
    return list(range(start, start + n))


def prefill(bm: BlockManager, rid: str, tokens: list[int], spans: list[MMSpan] | None = None) -> int:
    """Allocate and compute a whole prompt, as a scheduler would; returns num_cached_tokens."""
    spans = spans or []
    cached = bm.allocate_prompt(rid, tokens, spans)
    assert cached is not None
    bm.commit(rid, tokens, spans, len(tokens))
    return cached


def snapshot(bm: BlockManager, rids: list[str]) -> tuple:
    return (
        bm.num_free_blocks,
        bm.num_cached_blocks,
        bm.prefix_query_tokens,
        {r: bm.block_table(r) for r in rids if bm.has(r)},
        [bm.ref_count(b) for b in range(bm.num_blocks)],
    )


# ---- allocation -------------------------------------------------------------------------------


def test_allocate_and_free_counts():
    bm = make_bm(10)
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    assert bm.blocks_needed(0) == 0 and bm.blocks_needed(4) == 1 and bm.blocks_needed(5) == 2
    assert bm.allocate_prompt("a", toks(10)) == 0
    assert len(bm.block_table("a")) == 3
    assert bm.num_free_blocks == 7 and bm.usage == pytest.approx(0.3)
    assert bm.allocate_prompt("b", toks(4, 100)) == 0
    assert bm.num_free_blocks == 6
    assert not set(bm.block_table("a")) & set(bm.block_table("b"))
    bm.free("a")
    assert not bm.has("a") and bm.num_free_blocks == 9
    bm.free("b")
    assert bm.num_free_blocks == 10 and bm.usage == 0.0
    bm.check_invariants()


def test_allocate_twice_and_empty_prompt_raise():
    bm = make_bm()
    bm.allocate_prompt("a", toks(3))
    with pytest.raises(ValueError, match="already holds"):
        bm.allocate_prompt("a", toks(3))
    with pytest.raises(ValueError, match="empty"):
        bm.allocate_prompt("b", [])


def test_append_slots_growth_and_failure_when_full():
    bm = make_bm(4)
    bm.allocate_prompt("a", toks(5))
    assert len(bm.block_table("a")) == 2
    assert bm.append_slots("a", 8) and len(bm.block_table("a")) == 2  # still fits
    assert bm.append_slots("a", 3) and len(bm.block_table("a")) == 2  # never shrinks
    assert bm.append_slots("a", 9) and len(bm.block_table("a")) == 3
    assert bm.append_slots("a", 16) and bm.num_free_blocks == 0
    before = snapshot(bm, ["a"])
    assert not bm.append_slots("a", 17)
    assert snapshot(bm, ["a"]) == before
    with pytest.raises(KeyError):
        bm.append_slots("unknown", 4)


def test_insufficient_blocks_returns_none_and_leaves_state_unchanged():
    bm = make_bm(4)
    bm.allocate_prompt("a", toks(9))
    before = snapshot(bm, ["a", "b"])
    assert bm.allocate_prompt("b", toks(5, 50)) is None
    assert not bm.has("b") and snapshot(bm, ["a", "b"]) == before
    bm.check_invariants()


def test_insufficient_blocks_counts_revived_cached_hits_as_taken():
    # 3 blocks: a's two full blocks stay cached after free, so all 3 are "free". b hits those two
    # and needs 2 more, but taking the hits removes them from the pool: only 1 is left -> None.
    bm = make_bm(3)
    prefill(bm, "a", toks(9))
    bm.free("a")
    assert bm.num_free_blocks == 3
    before = snapshot(bm, ["b"])
    assert bm.allocate_prompt("b", toks(13)) is None
    assert snapshot(bm, ["b"]) == before
    assert bm.allocate_prompt("c", toks(9)) == 8  # the cached blocks survived the refusal
    bm.check_invariants()


def test_free_unknown_id_is_a_noop():
    bm = make_bm()
    bm.free("never-seen")
    bm.allocate_prompt("a", toks(5))
    bm.free("a")
    bm.free("a")  # double free: also a no-op
    assert bm.num_free_blocks == bm.num_blocks
    bm.check_invariants()


# ---- prefix caching ----------------------------------------------------------------------------


def test_prefix_hit_shares_blocks_and_ref_counts():
    bm = make_bm()
    prompt_a = toks(2 * BS) + [100, 101, 102]
    prompt_b = toks(2 * BS) + [200, 201, 202, 203, 204]
    assert prefill(bm, "a", prompt_a) == 0
    assert prefill(bm, "b", prompt_b) == 2 * BS
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert tb[:2] == ta[:2]
    assert not set(tb[2:]) & set(ta)
    assert [bm.ref_count(b) for b in ta[:2]] == [2, 2]
    assert bm.num_cached_tokens("b") == 2 * BS
    assert bm.prefix_query_tokens == len(prompt_a) + len(prompt_b)
    assert bm.prefix_hit_tokens == 2 * BS
    assert bm.hit_rate == pytest.approx(2 * BS / (len(prompt_a) + len(prompt_b)))
    bm.free("a")
    assert [bm.ref_count(b) for b in ta[:2]] == [1, 1]
    bm.check_invariants()


def test_always_leaves_one_token_to_compute_at_block_multiples():
    bm = make_bm()
    prompt = toks(3 * BS)
    prefill(bm, "a", prompt)
    assert bm.num_cached_blocks == 3
    assert bm.allocate_prompt("b", prompt) == 2 * BS  # not 3 * BS
    ta, tb = bm.block_table("a"), bm.block_table("b")
    assert tb[:2] == ta[:2] and tb[2] != ta[2]  # the last block is private: b writes into it
    assert bm.ref_count(tb[2]) == 1
    prefill(bm, "c", toks(BS, 500))
    assert bm.allocate_prompt("d", toks(BS, 500)) == 0  # a single full block is never reused
    assert bm.allocate_prompt("e", toks(3 * BS + 1)) == 3 * BS  # one more token: all three hit


def test_different_image_hash_misses_same_image_hits():
    bm = make_bm()
    prompt = toks(4 * BS)
    image_at = BS + 1  # placeholder tokens in blocks 1 and 2
    prefill(bm, "a", prompt, [(image_at, BS + 2, "img-A")])
    # Same placeholder tokens, different pixels: only block 0 (before the image) may be reused.
    assert bm.allocate_prompt("b", prompt, [(image_at, BS + 2, "img-B")]) == BS
    assert bm.allocate_prompt("c", prompt, [(image_at, BS + 2, "img-A")]) == 3 * BS
    assert bm.allocate_prompt("d", prompt, []) == BS  # no image info at all is a different key too


def test_image_keys_cover_every_overlapped_block():
    bm = make_bm()
    prompt = toks(4 * BS)
    prefill(bm, "a", prompt, [(BS - 1, 2, "x")])  # straddles blocks 0 and 1
    assert bm.allocate_prompt("b", prompt, [(BS - 1, 2, "y")]) == 0
    assert bm.allocate_prompt("c", prompt, [(BS - 1, 2, "x")]) == 3 * BS


def test_forced_collision_is_detected():
    bm = make_bm(hash_fn=lambda _: 0)  # every block has the same key
    prefill(bm, "a", toks(BS) + [99])
    assert bm.num_cached_blocks == 1
    assert bm.allocate_prompt("b", toks(BS, 50) + [99]) == 0  # same key, other tokens
    assert bm.allocate_prompt("c", toks(BS) + [98]) == BS  # same key, same tokens: a real hit
    # Block 1 equals a's block 0 token for token and has the same key, but follows a different
    # prefix: its KV differs, so it must not be reused (the parent check catches this).
    assert bm.allocate_prompt("d", toks(BS) + toks(BS) + [97]) == BS
    assert len(set(bm.block_table("d"))) == 3
    bm.check_invariants()


def test_chunked_commit_registers_blocks_incrementally():
    bm = make_bm()
    prompt = toks(3 * BS + 2)
    bm.allocate_prompt("a", prompt)
    bm.commit("a", prompt, [], 0)
    assert bm.num_cached_blocks == 0
    bm.commit("a", prompt, [], BS + 1)
    assert bm.num_cached_blocks == 1
    bm.commit("a", prompt, [], len(prompt))
    assert bm.num_cached_blocks == 3
    bm.commit("a", prompt, [], len(prompt))  # idempotent
    assert bm.num_cached_blocks == 3
    with pytest.raises(ValueError):
        bm.commit("a", prompt, [], len(prompt) + 1)


def test_generated_tokens_become_reusable_prefix():
    bm = make_bm()
    seq = toks(BS + 2)
    prefill(bm, "a", seq)
    for t in range(100, 100 + BS + 1):  # decode: one token per step
        assert bm.append_slots("a", len(seq) + 1)
        seq.append(t)
        bm.commit("a", seq, [], len(seq))
    assert bm.num_cached_blocks == 2
    assert bm.allocate_prompt("b", seq + [7]) == 2 * BS  # a multi-turn follow-up reuses the reply


def test_concurrent_duplicate_commit_keeps_one_registration():
    bm = make_bm()
    prompt = toks(2 * BS + 1)
    assert bm.allocate_prompt("a", prompt) == 0
    assert bm.allocate_prompt("b", prompt) == 0  # nothing committed yet: no hit
    bm.commit("a", prompt, [], len(prompt))
    bm.commit("b", prompt, [], len(prompt))
    assert bm.num_cached_blocks == 2
    assert bm.allocate_prompt("c", prompt) == 2 * BS
    assert bm.block_table("c")[:2] == bm.block_table("a")[:2]
    for rid in "abc":
        bm.free(rid)
    assert bm.num_cached_blocks == 2  # b's private copies went back unhashed
    bm.check_invariants()


def test_duplicate_chain_continues_from_the_registered_block():
    # a commits block 0 only; b then commits blocks 0 (a duplicate) and 1. b's block 1 is chained
    # to a's block 0, so c reuses a's block 0 followed by b's block 1.
    bm = make_bm()
    prompt = toks(2 * BS + 1)
    bm.allocate_prompt("a", prompt)
    bm.allocate_prompt("b", prompt)
    bm.commit("a", prompt, [], BS)
    bm.commit("b", prompt, [], len(prompt))
    assert bm.allocate_prompt("c", prompt) == 2 * BS
    assert bm.block_table("c")[:2] == [bm.block_table("a")[0], bm.block_table("b")[1]]


def test_eviction_is_lru_and_evicted_blocks_no_longer_hit():
    bm = make_bm(4)
    prefill(bm, "a", toks(BS + 1, 0))  # 2 blocks: block 0 cached, block 1 unhashed
    prefill(bm, "b", toks(BS + 1, 100))
    bm.free("a")  # a's cached block is now the least recently freed
    bm.free("b")
    assert bm.num_free_blocks == 4 and bm.num_cached_blocks == 2
    prefill(bm, "c", toks(2 * BS + 1, 1000))  # 3 blocks: the 2 unhashed ones, then evicts a's
    assert bm.num_cached_blocks == 1 + 2
    bm.free("c")
    assert bm.allocate_prompt("b2", toks(BS + 1, 100)) == BS  # b's block survived
    assert bm.allocate_prompt("a2", toks(BS + 1, 0)) == 0  # a's was evicted: no stale hit
    bm.check_invariants()


def test_eviction_takes_a_requests_tail_blocks_first():
    bm = make_bm(6)
    prefill(bm, "a", toks(3 * BS + 1))  # 3 cached blocks + 1 unhashed
    bm.free("a")
    prefill(bm, "x", toks(3 * BS + 1, 500))  # 4 blocks: 3 unhashed, then evicts one of a's
    bm.free("x")
    assert bm.allocate_prompt("a2", toks(3 * BS + 1)) == 2 * BS  # a lost its last block, not its first


def test_allocation_prefers_unhashed_blocks_before_evicting():
    bm = make_bm(4)
    prefill(bm, "a", toks(BS + 1))  # block 0 cached, block 1 unhashed
    bm.free("a")
    bm.allocate_prompt("x", toks(2 * BS, 500))  # 2 blocks: one never-used, one unhashed
    assert bm.num_cached_blocks == 1
    bm.free("x")
    assert bm.allocate_prompt("a2", toks(BS + 1)) == BS


def test_disabled_prefix_caching_never_hits():
    bm = make_bm(enable_prefix_caching=False)
    prefill(bm, "a", toks(3 * BS))
    assert bm.num_cached_blocks == 0
    assert bm.allocate_prompt("b", toks(3 * BS)) == 0


def test_reset_prefix_cache():
    bm = make_bm()
    prefill(bm, "a", toks(2 * BS + 1))
    assert not bm.reset_prefix_cache()  # refused while blocks are in use
    bm.free("a")
    assert bm.reset_prefix_cache()
    assert bm.num_cached_blocks == 0 and bm.num_free_blocks == bm.num_blocks
    assert bm.allocate_prompt("b", toks(2 * BS + 1)) == 0
    bm.check_invariants()


def test_default_hash_is_stable_across_processes():
    item = (None, (1, 2, 3), ("img",))
    code = (
        "from epd.engine.block_manager import sha256_hash; "
        "print(sha256_hash((sha256_hash((None, (1, 2, 3), ('img',))), (4,), ())).hex())"
    )
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == sha256_hash((sha256_hash(item), (4,), ())).hex()


# ---- randomized invariants ----------------------------------------------------------------------


@dataclass
class SimRequest:
    tokens: list[int]
    spans: list[MMSpan]
    computed: int = 0
    holders: list[int] = field(default_factory=list)


def block_content(req: SimRequest, i: int, upto: int) -> tuple:
    """What the KV of block i depends on: every token up to `upto` and the images before it."""
    return tuple(req.tokens[:upto]), tuple(s for s in req.spans if s[0] < upto)


def compute(bm: BlockManager, kv: dict[int, tuple], rid: str, req: SimRequest, upto: int) -> None:
    """Pretend to run the model on tokens [computed, upto): write the simulated KV, then commit."""
    table = bm.block_table(rid)
    for i in range(req.computed // BS, bm.blocks_needed(upto)):
        assert bm.ref_count(table[i]) == 1, "wrote into a shared block"
        kv[table[i]] = block_content(req, i, min(upto, (i + 1) * BS))
    req.computed = upto
    bm.commit(rid, req.tokens, req.spans, upto)


def check_external_invariants(bm: BlockManager, live: dict[str, SimRequest]) -> None:
    holders: dict[int, int] = {}
    for rid in live:
        for b in bm.block_table(rid):
            holders[b] = holders.get(b, 0) + 1
    assert all(bm.ref_count(b) == holders.get(b, 0) for b in range(bm.num_blocks))
    in_use = sum(1 for b in range(bm.num_blocks) if bm.ref_count(b) > 0)
    assert bm.num_free_blocks == bm.num_blocks - in_use
    assert bm.usage == pytest.approx(in_use / bm.num_blocks)
    bm.check_invariants()


IMAGE_LENGTHS = {"x": 3, "y": 5}  # an image's placeholder count follows from its pixels


def new_request(rng: random.Random, prefixes: list[list[int]]) -> SimRequest:
    """A prompt from a few shared prefixes and a small vocabulary, maybe with one image inserted.

    Placeholder tokens (id 0, also used by text) go anywhere, so equal tokens can hide different
    image placements: the image keys must tell them apart.
    """
    tokens = list(rng.choice(prefixes)) + [rng.randrange(3) for _ in range(rng.randrange(1, 7))]
    spans: list[MMSpan] = []
    if rng.random() < 0.5:
        image = rng.choice("xy")
        offset = rng.randrange(len(tokens))
        tokens[offset:offset] = [0] * IMAGE_LENGTHS[image]
        spans.append((offset, IMAGE_LENGTHS[image], image))
    return SimRequest(tokens, spans)


def test_random_operations_keep_invariants_and_reuse_only_equal_content():
    rng = random.Random(1234)
    bm = make_bm(24)
    prefixes = [[rng.randrange(3) for _ in range(rng.randrange(1, 14))] for _ in range(4)]
    live: dict[str, SimRequest] = {}
    kv: dict[int, tuple] = {}  # block id -> simulated KV content
    hits = 0
    for step in range(3000):
        op = rng.random()
        if op < 0.3 or not live:
            rid, req = f"r{step}", new_request(rng, prefixes)
            before = snapshot(bm, list(live))
            cached = bm.allocate_prompt(rid, req.tokens, req.spans)
            if cached is None:
                assert snapshot(bm, list(live)) == before
                continue
            assert cached % BS == 0 and cached < len(req.tokens)
            table = bm.block_table(rid)
            for i in range(cached // BS):
                assert kv[table[i]] == block_content(req, i, (i + 1) * BS), "reused a block of other content"
            hits += cached > 0
            req.computed = cached
            live[rid] = req
            compute(bm, kv, rid, req, rng.randrange(cached + 1, len(req.tokens) + 1))
        elif op < 0.8:
            rid = rng.choice(list(live))
            req = live[rid]
            if req.computed < len(req.tokens):  # next prefill chunk
                compute(bm, kv, rid, req, rng.randrange(req.computed + 1, len(req.tokens) + 1))
            elif bm.append_slots(rid, len(req.tokens) + 1):  # decode one token
                req.tokens.append(rng.randrange(3))
                compute(bm, kv, rid, req, len(req.tokens))
        else:
            bm.free(rng.choice(list(live)))
            live = {r: q for r, q in live.items() if bm.has(r)}
        check_external_invariants(bm, live)
    assert hits > 50  # the workload really exercised prefix reuse
    for rid in list(live):
        bm.free(rid)
    assert bm.num_free_blocks == bm.num_blocks and bm.usage == 0.0
