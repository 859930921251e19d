"""`ProfileCosts` prices the batches a real scheduler makes as the real runner would run them.

A profile with known coefficients; batches from a real `Scheduler` over real `Request`s: pure
decode steps take the decode model (at the CUDA graph's padded size when the device has graphs),
everything else the prefill model; vision batches the encode model; connectors their latency and
bandwidth.
"""

from __future__ import annotations

import pytest

from epd.engine.block_manager import BlockManager
from epd.engine.request import Request
from epd.engine.scheduler import ScheduledBatch, Scheduler
from epd.inputs.types import ProcessedPrompt
from epd.plan.profile import Profile
from epd.plan.profile.features import TERMS
from epd.plan.profile.fit import StageFit
from epd.plan.profile.store import Measurement, ProfileMeta, StageProfile
from epd.sampling_params import SamplingParams

PREFILL = (1e-3, 1e-5, 1e-8, 1e-4)  # step, token, attention_pair, sequence
DECODE = (2e-3, 1e-5, 1e-7)  # step, sequence, context_token
ENCODE = (5e-4, 1e-4, 1e-6, 1e-9)  # batch, image, patch, patch_pair
TRANSFER = (3e-5, 1e-9)  # latency, per byte: 1 GB/s


def known_profile(graph_sizes: tuple[int, ...]) -> Profile:
    def stage(name: str, coefficients: tuple[float, ...], devices: tuple = ()) -> StageProfile:
        fit = StageFit(TERMS[name], coefficients, 0.0, 0.0, 1)
        return StageProfile(fit, (Measurement([[1, 1, 0]], 1.0),), devices)

    meta = ProfileMeta("cpu", "cpu", "float32", "m", "0" * 64, "0", "0", "dummy", "x", graph_sizes)
    stages = {"prefill": stage("prefill", PREFILL), "decode": stage("decode", DECODE)}
    stages["encode"] = stage("encode", ENCODE)
    return Profile(meta, stages, {"shm": stage("transfer", TRANSFER, ("cpu", "cpu"))})


def prefill_cost(seqs: list[tuple[int, int]]) -> float:
    pairs = sum(n * c + n * (n + 1) / 2 for n, c in seqs)
    values = (1, sum(n for n, _ in seqs), pairs, len(seqs))
    return sum(a * b for a, b in zip(PREFILL, values))


def decode_cost(rows: int, kv_rows: int) -> float:
    return sum(a * b for a, b in zip(DECODE, (1, rows, kv_rows)))


class Steps:
    """A real scheduler over text requests; each step advances them as the engine would."""

    def __init__(self) -> None:
        self.scheduler = Scheduler(BlockManager(200, 4), max_num_seqs=8, max_num_batched_tokens=64)

    def add(self, rid: str, num_tokens: int, first: int) -> None:
        ids = list(range(first, first + num_tokens))
        request = Request(rid, ProcessedPrompt(ids, [], []), SamplingParams(max_tokens=50), merge_size=2)
        self.scheduler.add(request)

    def step(self) -> tuple[ScheduledBatch, list[tuple[int, int]]]:
        """The batch (priced before it runs, as the runner sees it) and its (new, context) pairs."""
        batch = self.scheduler.schedule()
        seqs = [(n, r.num_computed_tokens) for r, n in zip(batch.requests, batch.num_new_tokens)]
        return batch, seqs

    def finish(self, batch: ScheduledBatch) -> None:
        for request, n in zip(batch.requests, batch.num_new_tokens):
            request.num_computed_tokens += n
            blocks = self.scheduler.blocks
            blocks.commit(request.request_id, request.all_token_ids, (), request.num_computed_tokens)
            request.output_token_ids.append(7)


def test_prefill_then_pure_decode_then_mixed_steps_with_graphs():
    costs, steps = known_profile((1, 2, 4, 8)).compute_costs(), Steps()
    for i in range(3):
        steps.add(f"r{i}", 10, 100 * i)

    batch, seqs = steps.step()
    assert seqs == [(10, 0)] * 3
    assert costs.step_seconds(batch) == pytest.approx(prefill_cost(seqs))
    steps.finish(batch)

    batch, seqs = steps.step()  # three decodes: the graph of 4 rows replays
    assert seqs == [(1, 10)] * 3
    assert costs.step_seconds(batch) == pytest.approx(decode_cost(rows=4, kv_rows=3 * 11))
    steps.finish(batch)

    steps.add("late", 20, 900)
    batch, seqs = steps.step()  # decodes ride along with a prefill: an eager step
    assert seqs == [(1, 11)] * 3 + [(20, 0)]
    assert costs.step_seconds(batch) == pytest.approx(prefill_cost(seqs))


def test_without_graphs_a_decode_is_not_padded_and_past_the_largest_graph_it_runs_eagerly():
    steps = Steps()
    for i in range(3):
        steps.add(f"r{i}", 10, 100 * i)
    steps.finish(steps.step()[0])
    batch, seqs = steps.step()

    cpu = known_profile(()).compute_costs()
    assert cpu.step_seconds(batch) == pytest.approx(decode_cost(rows=3, kv_rows=33))
    small_graphs = known_profile((1, 2)).compute_costs()
    assert small_graphs.step_seconds(batch) == pytest.approx(prefill_cost(seqs))


def test_vision_batches_and_transfers():
    profile = known_profile(())
    grids = [(1, 4, 4), (1, 8, 8)]
    want = ENCODE[0] + ENCODE[1] * 2 + ENCODE[2] * (16 + 64) + ENCODE[3] * (16**2 + 64**2)
    assert profile.compute_costs().encode_seconds(grids) == pytest.approx(want)
    assert profile.transfer("shm") == pytest.approx((3e-5, 1e9))
    with pytest.raises(KeyError, match="cuda_ipc"):
        profile.transfer("cuda_ipc")


def test_a_profile_without_every_compute_stage_gives_no_cost_model():
    profile = known_profile(())
    partial = Profile(profile.meta, {"decode": profile.stages["decode"]}, profile.transfers)
    with pytest.raises(ValueError, match="prefill"):
        partial.compute_costs()
