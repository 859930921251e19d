"""The router and instance cores together, without processes: the deterministic harness (epd.sim).

Scripted compute (no weights; tokens a function of the prompt and the image embeddings), memory
connectors, a virtual clock: 1000 requests per layout in a few seconds. Every layout must give
every request the same tokens (a routing, transfer or cache bug changes them), clean up after
itself, and write the same event log whenever it runs with the same seed, also in another process
where strings hash differently (sets of strings iterate in another order there).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from epd.sim import ClusterSpec, SimCluster, SimResult, Workload, engine_config, make_requests, simulate

LAYOUTS = ("1E+1P+1D", "2E+2P+1D", "4EPD")
NUM_REQUESTS = 1000
# Caches small enough to evict, few KV blocks (preemption), many distinct images: what the
# default workload never needs to do, with PYTHONHASHSEED-sensitive code paths on the way.
PRESSURE_LAYOUT = "2E+2P+1D"
PRESSURE = {"requests": 300, "rate": 200.0, "image_pool": 60}
PRESSURE_SIZES = {"kv_blocks": 64, "mm_cache_bytes": 16 * 256 * 20}  # 20 blocks of 16 tokens
WAIT_S = 300  # a bound on the other process, never a guess at how long it takes


@pytest.fixture(scope="module")
def model(checkpoints) -> str:
    return str(checkpoints["qwen2_5_vl"])


def other_hash_seed() -> str:
    """A PYTHONHASHSEED that differs from this process's (when it has a fixed one)."""
    return "2" if os.environ.get("PYTHONHASHSEED") == "1" else "1"


class OtherProcess:
    """Layouts run by `python -m epd.sim` in a process with other string hashes, started at once so
    that it runs alongside this one; its summaries are read when first asked for."""

    def __init__(self, model: str, layouts: list[str], **options: object) -> None:
        args = [sys.executable, "-m", "epd.sim", "--model", model]
        args += [a for layout in layouts for a in ("--layout", layout)]
        args += [a for name, value in options.items() for a in (f"--{name.replace('_', '-')}", str(value))]
        env = dict(os.environ, PYTHONHASHSEED=other_hash_seed())
        self.process = subprocess.Popen(
            args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
        )
        self._summaries: dict[str, dict] | None = None

    def summaries(self) -> dict[str, dict]:
        if self._summaries is None:
            out, err = self.process.communicate(timeout=WAIT_S)
            assert self.process.returncode == 0, err
            self._summaries = {line["layout"]: line for line in map(json.loads, out.splitlines())}
        return self._summaries

    def stop(self) -> None:
        if self.process.poll() is None:  # a test failed before reading it
            self.process.kill()
            self.process.communicate()


@pytest.fixture(scope="module")
def other_process(model) -> Iterator[dict[str, OtherProcess]]:
    started = {
        "main": OtherProcess(model, list(LAYOUTS), requests=NUM_REQUESTS),
        "pressure": OtherProcess(model, [PRESSURE_LAYOUT], **PRESSURE, **PRESSURE_SIZES),
    }
    yield started
    for process in started.values():
        process.stop()


class Runs:
    """Each layout run once in this process, on first use: (cluster, result, wall seconds)."""

    def __init__(self, model: str) -> None:
        self.engine = engine_config(model)
        self.requests = make_requests(Workload(num_requests=NUM_REQUESTS), self.engine.model)
        self.done: dict[str, tuple[SimCluster, SimResult, float]] = {}

    def __getitem__(self, layout: str) -> tuple[SimCluster, SimResult, float]:
        if layout not in self.done:
            started = time.perf_counter()
            cluster = SimCluster(ClusterSpec(layout, self.engine))
            result = simulate(cluster, self.requests)
            self.done[layout] = (cluster, result, time.perf_counter() - started)
        return self.done[layout]


@pytest.fixture(scope="module")
def runs(model, other_process) -> Runs:
    return Runs(model)


def tokens(result: SimResult) -> dict[str, list[int]]:
    return {rid: out.outputs[0].token_ids for rid, out in result.outputs.items()}


@pytest.mark.parametrize("layout", LAYOUTS)
def test_every_request_finishes_and_nothing_is_left_held(runs, layout, record_property):
    cluster, result, wall_s = runs[layout]
    record_property("wall_s", round(wall_s, 2))
    print(f"{layout}: {NUM_REQUESTS} requests in {wall_s:.2f} s wall, {result.end_time:.1f} s virtual")

    assert len(result.outputs) == NUM_REQUESTS
    assert {out.error for out in result.outputs.values()} == {None}
    assert {out.outputs[0].finish_reason for out in result.outputs.values()} <= {"length", "stop"}
    assert cluster.router.ledger.is_empty() and not cluster.router.has_unfinished()
    assert result.leftovers == []
    assert all(node.core.ready_message("x").vision_parameters == 0 for node in cluster.nodes), "no weights"


def test_the_workload_reaches_the_caches_and_the_transfers(runs):
    cluster, result, _ = runs["2E+2P+1D"]
    keys = [e.what for e in result.log.entries if e.kind == "transfer"]
    assert any(k.startswith("mm:") for k in keys) and any(k.startswith("kv:") for k in keys)
    assert cluster.router.stats["encode_cache_hits"] > 0, "images repeat: some must hit an encoder cache"
    assert all(result.turns[n.name] > 0 for n in cluster.nodes), "every instance took work"
    engines = [n.core.engine for n in cluster.nodes if n.core.engine is not None]
    assert sum(e.block_manager.prefix_hit_tokens for e in engines) > 0


def test_every_layout_gives_every_request_the_same_tokens(runs):
    reference = tokens(runs[LAYOUTS[0]][1])
    for layout in LAYOUTS[1:]:
        other = tokens(runs[layout][1])
        differ = [rid for rid in reference if other[rid] != reference[rid]]
        assert not differ, f"{layout} differs from {LAYOUTS[0]} in {len(differ)} requests, e.g. {differ[0]}"


@pytest.mark.parametrize("layout", LAYOUTS)
def test_the_same_seed_writes_the_same_log_in_a_process_with_other_string_hashes(runs, other_process, layout):
    there = other_process["main"].summaries()[layout]
    _, result, _ = runs[layout]
    assert there["string_hash"] != hash("epd"), "the other process must hash strings differently"
    assert there["finished"] == NUM_REQUESTS and there["leftovers"] == []
    assert there["digest"] == result.log.digest()


@pytest.fixture(scope="module")
def pressure_run(model) -> SimResult:
    engine = engine_config(model, num_kv_blocks=PRESSURE_SIZES["kv_blocks"])
    workload = Workload(PRESSURE["requests"], PRESSURE["rate"], image_pool=PRESSURE["image_pool"])
    spec = ClusterSpec(PRESSURE_LAYOUT, engine, mm_cache_bytes=PRESSURE_SIZES["mm_cache_bytes"])
    return simulate(SimCluster(spec), make_requests(workload, engine.model))


def test_under_cache_pressure_every_request_still_finishes_clean(pressure_run):
    assert len(pressure_run.outputs) == PRESSURE["requests"] and pressure_run.leftovers == []
    assert {out.error for out in pressure_run.outputs.values()} == {None}
    assert any(e.what == "EmbeddingsEvicted" for e in pressure_run.log.entries), "the caches must evict"


def test_under_cache_pressure_the_log_does_not_depend_on_string_hashes(pressure_run, other_process):
    there = other_process["pressure"].summaries()[PRESSURE_LAYOUT]
    assert there["leftovers"] == []
    assert there["digest"] == pressure_run.log.digest()


def test_latencies_delay_requests_and_change_no_token(model):
    engine = engine_config(model)
    requests = make_requests(Workload(num_requests=100), engine.model)
    fast = simulate(SimCluster(ClusterSpec("1E+1P+1D", engine)), requests)
    slow_spec = ClusterSpec(
        "1E+1P+1D", engine, control_latency_s=1e-3, transfer_latency_s=5e-3, transfer_bandwidth=1e8
    )
    slow = simulate(SimCluster(slow_spec), requests)

    assert tokens(slow) == tokens(fast) and slow.leftovers == []
    # Every request crosses two control hops before its first token (in to P, out from P), and
    # nearly all also a 5 ms KV transfer and one more hop (D's updates) before their end.
    assert _mean(slow, "first_token_time") > _mean(fast, "first_token_time") + 2e-3
    assert _mean(slow, "finished_time") > _mean(fast, "finished_time") + 6e-3


def _mean(result: SimResult, metric: str) -> float:
    """The mean time from arrival to `metric` (a RequestMetrics time)."""
    outputs = [o.metrics for o in result.outputs.values()]
    return sum(getattr(m, metric) - m.arrival_time for m in outputs) / len(outputs)
