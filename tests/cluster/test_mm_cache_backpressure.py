"""A full MM cache on a prefill instance makes requests wait, not fail (epd.cluster.instance.prefill_stage).

The real router and instance cores on the harness's virtual clock, scripted compute: a burst of
image requests against a prefill instance whose MM cache holds a dozen blocks of 16 tokens. Before
the back-pressure, 24 of these 200 requests failed with "the MM cache of this prefill instance is
full"; now each one finishes with the tokens of a run with room to spare, and nothing stays held.
"""

from __future__ import annotations

import pytest

from epd.sim import ClusterSpec, SimCluster, SimResult, Workload, engine_config, make_requests, simulate
from epd.sim.workload import SimRequest

BLOCK_BYTES = 16 * 256  # 16 tokens of the tiny model's 64-wide fp32 embeddings
WORKLOAD = Workload(num_requests=200, rate_per_s=400.0, image_pool=200, max_images=3, image_sides=(112, 168))


@pytest.fixture(scope="module")
def engine(checkpoints):
    return engine_config(str(checkpoints["qwen2_5_vl"]))


@pytest.fixture(scope="module")
def requests(engine) -> list[SimRequest]:
    return make_requests(WORKLOAD, engine.model)


def run(engine, requests, mm_cache_bytes: int, layout: str = "2E+1P+1D") -> tuple[SimCluster, SimResult]:
    cluster = SimCluster(ClusterSpec(layout, engine, mm_cache_bytes=mm_cache_bytes))
    return cluster, simulate(cluster, requests)


def tokens(result: SimResult) -> dict[str, list[int]]:
    return {rid: out.outputs[0].token_ids for rid, out in result.outputs.items()}


def test_a_full_cache_makes_requests_wait_and_every_one_finishes(engine, requests):
    _, roomy = run(engine, requests, 64 * BLOCK_BYTES)
    cluster, tight = run(engine, requests, 12 * BLOCK_BYTES)
    assert {out.error for out in roomy.outputs.values()} == {None}
    assert {out.error for out in tight.outputs.values()} == {None}
    assert tokens(tight) == tokens(roomy)
    assert tight.leftovers == [] and cluster.router.ledger.is_empty()
    # The back-pressure was exercised: images that found no room were asked for again.
    asked = [e for e in tight.log.entries if e.what == "NeedEmbeddings"]
    assert len(asked) > len([e for e in roomy.log.entries if e.what == "NeedEmbeddings"])


def test_a_request_whose_images_exceed_the_whole_cache_is_refused_at_once(engine, requests):
    many = next(
        r
        for r in requests
        if len(r.prompt.images) == 3 and len({i.content_hash for i in r.prompt.images}) == 3
    )
    blocks = sum(-(-ph.length // 16) for ph in many.prompt.placeholders)
    _, result = run(engine, [many], (blocks - 1) * BLOCK_BYTES)
    [out] = result.outputs.values()
    assert out.invalid_input and "MM cache" in out.error and "holds" in out.error
    assert result.leftovers == []
