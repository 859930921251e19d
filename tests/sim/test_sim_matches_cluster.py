"""The simulator places requests as the real cluster does: same prefill, decode and encoder for
every request and image, and text requests start on each instance in the same order.

Both run the same router core, so this checks everything around it: that the simulator builds the
same requests and instances, and delivers what the cores send as processes and sockets do.
Requests come in bursts (all of a burst at one instant, the next once it has drained), so every
placement depends on what the router has reserved and learned, not on how long a step took: the
real cluster's timing on a shared CPU cannot change the answer, and no cost model is needed. (When
a request with images starts, next to the others of its burst, does depend on how long encoding
took: that is what a profile-calibrated cost model predicts, checked against real GPU runs.)
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
PLACED_BY = (Event.ENCODE_START, Event.PREFILL_START, Event.DECODE_START)


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


def text_order_per_instance(outputs: dict[str, RequestOutput]) -> dict[str, list[str]]:
    """Per instance: the text-only requests it started prefilling, in the order it did."""
    starts = [
        (e.time, e.instance, rid)
        for rid, out in outputs.items()
        for e in out.metrics.events
        if e.event is Event.PREFILL_START and not out.metrics.breakdown().get("encode")
    ]
    order: dict[str, list[str]] = {}
    for _, instance, rid in sorted(starts):
        order.setdefault(instance, []).append(rid)
    return order


def run_cluster(model: str, layout: str, requests: list[SimRequest]) -> dict[str, RequestOutput]:
    outputs: dict[str, RequestOutput] = {}
    with LLM(model, layout=layout, max_model_len=1024, block_size=16, num_kv_blocks=1024) as llm:
        cluster = llm.engine
        for start in range(0, len(requests), BURST_SIZE):
            burst = requests[start : start + BURST_SIZE]
            for r in burst:
                cluster.add_request(r.request_id, r.prompt, r.params)
            while not all(r.request_id in outputs for r in burst):
                outputs.update({o.request_id: o for o in cluster.step() if o.finished})
    return outputs


@pytest.mark.parametrize("layout", ["1E+1P+1D", "2E+2P+1D", "4EPD"])
def test_the_simulator_places_every_request_where_the_cluster_does(checkpoints, layout):
    model = str(checkpoints["qwen2_5_vl"])
    requests = bursty_requests(model)
    assert sum(len(r.prompt.images) for r in requests) >= 10, "the workload must exercise encoders"

    simulated = simulate(SimCluster(ClusterSpec(layout, engine_config(model))), requests).outputs
    real = run_cluster(model, layout, requests)

    assert {o.error for o in real.values()} == {None} and {o.error for o in simulated.values()} == {None}
    assert placements(simulated) == placements(real)
    assert text_order_per_instance(simulated) == text_order_per_instance(real)
    if layout != "4EPD":
        used = {instance for per_request in placements(real).values() for _, instance, _ in per_request}
        assert {"E0", "P0", "D0"} <= used
