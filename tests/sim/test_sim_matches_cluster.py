"""The simulator places requests as the real cluster does: the same prefill and decode instance for
every request.

Both run the same router core, so this checks everything around it: that the simulator builds the
same requests and instances, and delivers what the cores send as processes and sockets do.
Requests come in bursts (all of a burst at one instant, the next once it has drained), so every
prefill and decode choice depends on what the router has reserved, not on how long a step took:
the real cluster's timing on a shared CPU cannot change the answer, and no cost model is needed.
(Which encoder takes an image does depend on timing: an image still being encoded, by the router's
last news, goes to the same encoder; so do the order in which requests start on an instance and
whether an encoder's report reaches the router before its request ends. Those are what a
profile-calibrated cost model predicts, to be checked against real GPU runs.)
"""

from __future__ import annotations

from dataclasses import replace

import pytest

from epd import LLM
from epd.lifetime import Event
from epd.outputs import RequestOutput
from epd.sim import ClusterSpec, SimCluster, Workload, engine_config, make_requests, simulate
from epd.sim.workload import SimRequest

BURSTS, BURST_SIZE, BURST_GAP_S = 5, 4, 1000.0
KV_BLOCKS, MM_CACHE = 1024, 16 << 20  # the same caches on both sides: what they evict must match
PLACED_BY = (Event.PREFILL_START, Event.DECODE_START)


def bursty_requests(model: str) -> list[SimRequest]:
    """Seeded prompts (0-3 images from a shared pool, so caches hit), greedy, a fixed length."""
    workload = Workload(num_requests=BURSTS * BURST_SIZE, seed=11, max_images=3, output_tokens=(6, 6))
    requests = make_requests(workload, engine_config(model).model)
    return [
        replace(
            r,
            arrival_time=(i // BURST_SIZE) * BURST_GAP_S,
            params=replace(r.params, ignore_eos=True),
        )
        for i, r in enumerate(requests)
    ]


def placements(outputs: dict[str, RequestOutput]) -> dict[str, list[tuple[str, str | None, int | None]]]:
    """Per request: (event, instance, image) of every event that says where a part of it ran."""
    return {
        rid: sorted((e.event.value, e.instance, e.item) for e in out.metrics.events if e.event in PLACED_BY)
        for rid, out in outputs.items()
    }


def run_cluster(model: str, layout: str, requests: list[SimRequest]) -> dict[str, RequestOutput]:
    outputs: dict[str, RequestOutput] = {}
    with LLM(
        model, layout=layout, max_model_len=1024, num_kv_blocks=KV_BLOCKS, mm_cache_bytes=MM_CACHE
    ) as llm:
        cluster = llm.engine
        for start in range(0, len(requests), BURST_SIZE):
            burst = requests[start : start + BURST_SIZE]
            for r in burst:
                cluster.add_request(r.request_id, r.prompt, r.params)
            while not all(r.request_id in outputs for r in burst):
                outputs.update({o.request_id: o for o in cluster.step() if o.finished})
            # A request can end before its encoder's report arrives (another socket); the next
            # burst is placed once the router knows every encode finished, as in the simulator.
            while cluster.router.core.affinity.inflight:
                cluster.step()
    return outputs


@pytest.mark.parametrize("layout", ["1E+1P+1D", "2E+2P+1D", "4EPD"])
def test_the_simulator_places_every_request_where_the_cluster_does(checkpoints, layout):
    model = str(checkpoints["qwen2_5_vl"])
    requests = bursty_requests(model)
    assert sum(len(r.prompt.images) for r in requests) >= 10, "the workload must exercise encoders"

    spec = ClusterSpec(layout, engine_config(model, num_kv_blocks=KV_BLOCKS), mm_cache_bytes=MM_CACHE)
    simulated = simulate(SimCluster(spec), requests).outputs
    real = run_cluster(model, layout, requests)

    assert {o.error for o in real.values()} == {None} and {o.error for o in simulated.values()} == {None}
    assert placements(simulated) == placements(real)
    if layout != "4EPD":
        used = {instance for per_request in placements(real).values() for _, instance, _ in per_request}
        assert {"P0", "D0"} <= used
